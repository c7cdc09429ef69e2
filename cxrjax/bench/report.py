"""Write a benchmark result as JSON, a Markdown report and plots (matplotlib, lazily)."""

from __future__ import annotations

import json
from pathlib import Path

from cxrjax.bench.memory import GIB, MIB
from cxrjax.tables import number, table

NA = "—"
EXPLAINER = (
    "Throughput comes from steps launched back to back; step time is the median of steps waited for "
    "one by one; compile time is cxrjax's `lower().compile()`; first call is the first step (lazy "
    "compilation for torch.compile and Keras). FLOPs are XLA's cost analysis of the cxrjax step; MFU "
    "uses the cxrjax step's FLOPs without remat for every framework. Peak memory is the allocator's "
    "peak on GPU; on CPU, MiB/image comes from XLA's buffer assignment of the compiled step. Saved MiB/image "
    "is what the backward pass keeps (jax.vjp residuals counted from shapes): the part remat controls."
)


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return number(value, spec, scale, na=NA)


def format_bytes(value) -> str:
    """Bytes in the largest binary unit that keeps at least one whole unit."""
    if value is None:
        return NA
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


SETTING = ["px", "dtype", "remat"]


def _setting(row: dict) -> list[str]:
    """The cells under SETTING."""
    return [str(row["size"]), row["dtype"], row["remat"]]


def _status(row: dict) -> str:
    """'ok', or the status and why (a "|" in the reason would end the cell)."""
    return "ok" if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}".replace("|", "/")


def measurements_table(rows: list[dict]) -> str:
    header = [
        "task",
        "framework",
        *SETTING,
        "devices",
        "batch/device",
        "images/s",
        "images/s/device",
        "step ms (median)",
        "compile s",
        "first call s",
        "GFLOP/image",
        "MFU",
        "peak GiB",
        "MiB/image",
        "saved MiB/image",
        "status",
    ]
    body = [
        [
            r["task"],
            r["framework"],
            *_setting(r),
            str(r.get("devices") or NA),
            str(r["batch_per_device"]),
            *_throughput(r),
            _fmt(r.get("step_s_median"), ".1f", 1e3),
            _fmt(r.get("compile_s"), ".1f"),
            _fmt(r.get("first_step_s"), ".2f"),
            _fmt(r.get("flops_per_image"), ".3f", 1e-9),
            _fmt(r.get("mfu"), ".1%"),
            _fmt(r.get("peak_bytes"), ".2f", 1 / GIB),
            _mib(r.get("bytes_per_image")),
            _mib(r.get("saved_activation_bytes_per_image")),
            _status(r),
        ]
        for r in rows
    ]
    return table(header, body)


def _throughput(row: dict) -> list[str]:
    """images/s and images/s/device."""
    return [_fmt(row.get("images_per_s"), ".1f"), _fmt(row.get("images_per_s_per_device"), ".1f")]


def _mib(value) -> str:
    return _fmt(value, ".1f", 1 / MIB)


def ratios_table(ratios: list[dict]) -> str:
    header = [
        "task",
        *SETTING,
        "peer",
        "cxrjax images/s/device",
        "peer images/s/device",
        "cxrjax ÷ peer (images/s)",
        "cxrjax ÷ peer (median step)",
        "cxrjax MiB/image",
        "peer MiB/image",
    ]
    body = [
        [
            r["task"],
            *_setting(r),
            r["peer"],
            _fmt(r["cxrjax_images_per_s_per_device"], ".1f"),
            _fmt(r["peer_images_per_s_per_device"], ".1f"),
            _fmt(r["speedup"], ".2f"),
            _fmt(r["speedup_median_step"], ".2f"),
            _mib(r["cxrjax_bytes_per_image"]),
            _mib(r["peer_bytes_per_image"]),
        ]
        for r in ratios
    ]
    return table(header, body)


def max_batch_table(rows: list[dict]) -> str:
    header = [
        "framework",
        *SETTING,
        "budget",
        "largest batch/device",
        "step memory at batch",
        "at batch + 1",
        "probes",
        "status",
    ]
    body = []
    for r in rows:
        if r["status"] != "ok":
            cells = [NA] * 5
        else:
            cells = [
                format_bytes(r["budget_bytes"]),
                str(r["batch"]),
                format_bytes(r["bytes_at_batch"]),
                format_bytes(r["bytes_at_next"]),
                str(len(r["probes"])),
            ]
        body.append([r["framework"], *_setting(r), *cells, _status(r)])
    return table(header, body)


COMPILED_EXPLAINER = (
    "Compiled for the target, not measured: nothing ran. Memory is XLA's buffer assignment of the training "
    "step compiled for the described GPU (arguments + outputs - donated + temporaries, per device); compile-only "
    "convolutions carry no cuDNN workspace, which the allowance stands for. MiB/image is that total over the "
    "batch per device. FLOPs are counted from the same step lowered for the CPU. Compile s is this host's "
    "wall clock, not the GPU machine's. The largest batch comes from two compiles and a third that checks the "
    "prediction (extrapolated when the check did not fit)."
)


def compiled_table(rows: list[dict]) -> str:
    header = [
        "target",
        "devices",
        *SETTING,
        "batch/device",
        "arguments",
        "outputs",
        "donated",
        "temporaries",
        "total",
        "MiB/image",
        "saved MiB/image",
        "GFLOP/image",
        "compile s",
        "budget",
        "largest batch/device",
        "status",
    ]
    body = []
    for r in rows:
        if r["status"] != "ok":
            cells = [r.get("target") or NA, NA, *_setting(r), str(r["batch_per_device"]), *[NA] * 11]
            body.append([*cells, _status(r)])
            continue
        m, plan = r["compiled_memory"], r["largest_batch"]
        largest = f"{plan['batch']} ({'fits, compiled' if plan['confirmed'] else 'extrapolated'})"
        if plan.get("refined_batch") and plan["refined_batch"] != plan["batch"]:
            largest += f"; last two probes' line: {plan['refined_batch']}"
        body.append(
            [
                r["device_kind"],
                str(r["devices"]),
                *_setting(r),
                str(r["batch_per_device"]),
                *(
                    format_bytes(m[k])
                    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes")
                ),
                _mib(r["bytes_per_image"]),
                _mib(r.get("saved_activation_bytes_per_image")),
                _fmt(r.get("flops_per_image"), ".2f", 1e-9),
                _fmt(r.get("compile_s"), ".0f"),
                format_bytes(plan["budget_bytes"]),
                largest,
                "ok",
            ]
        )
    return table(header, body)


def plan_check_table(rows: list[dict]) -> str:
    header = [
        *SETTING,
        "batch/device",
        "compiled for",
        "compiled MiB/image",
        "measured peak MiB/image",
        "measured ÷ compiled",
    ]
    body = [
        [
            *_setting(r),
            str(r["batch_per_device"]),
            r["target_name"],
            _mib(r["compiled_bytes_per_image"]),
            _mib(r["measured_bytes_per_image"]),
            _fmt(r["measured_over_compiled"], ".2f"),
        ]
        for r in rows
    ]
    return table(header, body)


def scaling_table(rows: list[dict]) -> str:
    header = [*SETTING, "devices", "batch/device", "images/s", "images/s/device", "efficiency", "status"]
    body = [
        [
            *_setting(r),
            str(r["devices"]),
            str(r["batch_per_device"]),
            *_throughput(r),
            _fmt(r.get("efficiency"), ".2f"),
            _status(r),
        ]
        for r in rows
    ]
    return table(header, body)


def fed_table(rows: list[dict]) -> str:
    header = [*SETTING, "workers", "synthetic images/s", "grain-fed images/s", "fed ÷ synthetic", "input-bound"]
    body = [
        [
            *_setting(r),
            str(r.get("workers", NA)),
            _fmt(r.get("synthetic_images_per_s"), ".1f"),
            _fmt(r.get("images_per_s"), ".1f"),
            _fmt(r.get("fed_fraction"), ".2f"),
            NA if r["status"] != "ok" else ("yes" if r["input_bound"] else "no"),
        ]
        for r in rows
    ]
    return table(header, body)


def targets_table(rows: list[dict]) -> str:
    return table(["target", "measured", "status"], [[t["target"], _fmt(t["value"], ".2f"), t["status"]] for t in rows])


def markdown(results: dict) -> str:
    meta = results["meta"]
    device = meta["device"]
    peak = device.get("peak_flops")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    rows = results["measurements"]
    steady = [r for r in rows if r["task"] in ("train", "inference")]
    fed = [r for r in rows if r["task"] == "train_fed"]
    compiled = results.get("compiled", [])
    measured = bool(rows or results["max_batch"] or results["scaling"])
    peak_text = f"{peak['name']} — {peak['source']}" if peak else "none listed for this device, MFU not reported"
    where = device.get("device_kind") or ("GPU targets, compiled (nothing ran)" if compiled else "unknown device")
    parts = [
        f"# cxrjax bench: {meta['name']} on {where}",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
    ]
    if measured:
        parts += [
            f"- device: {device.get('device_kind')} ({device.get('platform')}, {device.get('devices')} device(s))",
            f"- MFU peak: {peak_text}",
        ]
    cuda = sorted({(r["cuda"], r["cudnn"]) for r in compiled if r["status"] == "ok"})
    if cuda:
        parts.append("- compiled for: " + "; ".join(f"CUDA {c}, cuDNN {d}" for c, d in cuda))
    parts += [
        f"- host: {meta['host']['cpu_count']} CPUs, {meta['host']['machine']}, Python {meta['host']['python']}",
        f"- versions: {versions}",
        *[f"- note: {n}" for n in meta["notes"]],
    ]
    if measured:
        parts += ["", EXPLAINER]
    if steady:
        parts += ["", "## Measurements", "", measurements_table(steady)]
    sections = (
        ("Compiled for a GPU target (not measured)", compiled, compiled_section),
        ("The compiled plan against the measured peak", results.get("plan_check", []), plan_check_table),
        ("Same-run ratios (cxrjax ÷ peer, per device)", results["ratios"], ratios_table),
        ("Training fed by the grain pipeline", fed, fed_table),
        ("Largest batch under the memory budget", results["max_batch"], max_batch_table),
        ("Scaling over devices (fixed batch per device)", results["scaling"], scaling_table),
        ("Targets (judged on GPU rows only, saved activations on any)", results["targets"], targets_table),
    )
    for title, items, render in sections:
        if items:
            parts += ["", f"## {title}", "", render(items)]
    return "\n".join(parts) + "\n"


def compiled_section(rows: list[dict]) -> str:
    return COMPILED_EXPLAINER + "\n\n" + compiled_table(rows)


COLORS = {"cxrjax": "tab:blue", "torch": "tab:orange", "torch_compile": "tab:green", "keras": "tab:red"}


def bar_figure(ok: list[dict], value: str, ylabel: str, scale: float, title: str):
    """One panel per task that was measured (training, inference), bars per framework and
    setting at each image size, the x axis spanning the sizes."""
    import matplotlib.pyplot as plt

    tasks = [t for t in ("train", "inference") if any(r["task"] == t for r in ok)]
    series_keys = sorted(
        {(r["framework"], r["dtype"], r["remat"]) for r in ok}, key=lambda k: (list(COLORS).index(k[0]), k[1], k[2])
    )
    sizes = sorted({r["size"] for r in ok})
    width = 0.8 / max(len(series_keys), 1)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks) + 0.5, 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, (framework, dtype, remat) in enumerate(series_keys):
            points = [
                (sizes.index(r["size"]), r[value])
                for r in ok
                if r["task"] == task
                and (r["framework"], r["dtype"], r["remat"]) == (framework, dtype, remat)
                and r.get(value) is not None
            ]
            offset = (i - (len(series_keys) - 1) / 2) * width
            ax.bar(
                [x + offset for x, _ in points],
                [v * scale for _, v in points],
                width,
                color=COLORS[framework],
                alpha=1.0 if dtype == "float32" else 0.5,
                hatch={"none": None, "dense_layers": "//", "all": "xx"}.get(remat),
                edgecolor="black",
                linewidth=0.3,
                label=f"{framework} {dtype} remat {remat}",
            )
        ax.set_xticks(range(len(sizes)), [f"{s} px" for s in sizes])
        ax.set_xlim(-0.5, len(sizes) - 0.5)  # the size labels under their bars, not at the panel's edges
        ax.set(title=task, ylabel=ylabel)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return fig


def plot(results: dict, out: Path, stem: str) -> list[str]:
    """Throughput and memory per image against image size; scaling when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["measurements"] if r["status"] == "ok" and r["task"] in ("train", "inference")]
    written = []
    if not ok and not results["scaling"]:  # nothing measured (a compiled-only run): no empty figures
        return written

    figures = (
        (f"{stem}-throughput.png", "images_per_s_per_device", "images/s per device", 1.0),
        (f"{stem}-memory.png", "bytes_per_image", "MiB per image (peak, else compiled)", 1 / MIB),
    )
    title = f"{results['meta']['name']} on {results['meta']['device'].get('device_kind')}"
    for name, value, ylabel, scale in figures if ok else ():
        fig = bar_figure(ok, value, ylabel, scale, title)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    scaling = [r for r in results["scaling"] if r["status"] == "ok"]
    if scaling:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        groups = {}
        for r in scaling:
            groups.setdefault(f"{r['size']}px {r['dtype']} remat {r['remat']}", []).append(r)
        for label, rows in groups.items():
            rows = sorted(rows, key=lambda r: r["devices"])
            ax.plot([r["devices"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=label)
            base = rows[0]["images_per_s"] / rows[0]["devices"]
            ax.plot([r["devices"] for r in rows], [base * r["devices"] for r in rows], ls="--", color="grey")
        ax.set(xlabel="devices", ylabel="training images/s (total)", title="scaling (dashed: linear)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}-scaling.png", dpi=110)
        plt.close(fig)
        written.append(f"{stem}-scaling.png")
    return written


def write_report(results: dict, out: Path, stem: str) -> list[str]:
    """`<stem>.json`, `<stem>.md` and the plots in `out`; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    journal = [f"{stem}.jsonl"] if (out / f"{stem}.jsonl").exists() else []  # written case by case by the runner
    files = [f"{stem}.json", f"{stem}.md", *journal, *plot(results, out, stem)]
    results["meta"]["files"] = files
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    return files
