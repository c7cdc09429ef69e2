"""`cxrjax bench --target`: the training step compiled for an NVIDIA GPU that is not here.

The tiny net is compiled for the A10G target on one device and on a g5.24xlarge's four,
through the CUDA plugin the dev extra installs (no driver, no card). Checked: the compiled
figures add up, the largest batch fits its budget and the next does not (by the line it was
found with), FLOPs come from the CPU lowering wherever the device cannot count them, and
the targets' figures all carry a source. No wall-clock time is asserted.
"""

import json
import math

import jax
import pytest

from cxrjax.bench import gpu_target
from cxrjax.bench.gpu_target import GpuTarget, TargetError, compile_only_devices, get_target, targets
from cxrjax.bench.jax_case import build_steps, flops, step_flops, synthetic_host_batch, training_config
from cxrjax.bench.memory import GIB, compiled_memory, planned_batch
from cxrjax.cli import main as cli_main
from cxrjax.mesh import make_mesh

SIZE, BATCH = 32, 2
BUDGET_GB = 0.004  # about 4 MiB: the tiny net's answer is a few dozen images, so the checking compile is small


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """What a user runs: the CLI, one case compiled for 4 x A10G (a g5.24xlarge)."""
    out = tmp_path_factory.mktemp("target")
    args = ["bench", "--out", str(out), "--arch", "tiny", "--sizes", str(SIZE), "--batch", str(BATCH)]
    code = cli_main([*args, "--target", "a10g", "--target-devices", "4", "--memory-budget-gb", str(BUDGET_GB)])
    assert code == 0
    return out, json.loads((out / "tiny.json").read_text())


@pytest.mark.slow
def test_four_a10gs_compile_and_the_figures_add_up(compiled_run):
    out, results = compiled_run
    assert results["measurements"] == [] and results["max_batch"] == [] and results["targets"] == []
    (row,) = results["compiled"]
    assert row["status"] == "ok", row
    assert (row["target"], row["device_kind"], row["platform"], row["devices"]) == (
        "a10g",
        "NVIDIA A10G",
        "compiled",
        4,
    )
    assert row["global_batch"] == 4 * BATCH
    m = row["compiled_memory"]
    assert m["total_bytes"] == m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
    assert m["alias_bytes"] > 0  # the state is donated
    assert row["bytes_per_image"] == m["total_bytes"] / BATCH
    assert row["cuda"] == row["cuda_versions"]["cuda"] and row["cudnn"] == row["cuda_versions"]["cudnn"]
    plan = row["largest_batch"]
    assert plan["budget_bytes"] == int(BUDGET_GB * GIB) and row["budget_source"] == "given"
    assert 1 <= plan["compiles"] <= 3 and str(BATCH) in plan["probes"] and str(2 * BATCH) in plan["probes"]
    assert plan["batch"] > 2 * BATCH  # the budget holds more than the probes
    if plan["confirmed"]:
        assert plan["bytes_at_batch"] == plan["probes"][str(plan["batch"])] <= plan["budget_bytes"]
    assert plan["predicted_bytes_at_next"] > plan["budget_bytes"]
    # Saved activations and FLOPs are per image and positive; FLOPs match the CPU lowering's count.
    assert row["saved_activation_bytes_per_image"] > 0
    labels = synthetic_host_batch(BATCH, SIZE)["labels"]
    cfg = training_config("tiny", "bfloat16", "none")
    assert row["flops_per_image"] == step_flops(cfg, SIZE, 4 * BATCH, labels) / (4 * BATCH)
    assert row["model_flops_per_image"] == row["flops_per_image"]  # remat none: nothing recomputed
    md = (out / "tiny.md").read_text()
    assert "Compiled for a GPU target (not measured)" in md and "nothing ran" in md
    assert "| NVIDIA A10G | 4 | 32 | bfloat16 | none | 2 |" in md
    assert not list(out.glob("*.png"))  # nothing measured, no empty throughput figures


@pytest.mark.slow
def test_one_device_plan_matches_the_four_device_plan_per_device(compiled_run):
    """Data parallel: each A10G holds the same state and its share of the batch, so the
    per-device arguments match one A10G's at the same per-device batch."""
    _, results = compiled_run
    four = results["compiled"][0]["compiled_memory"]
    (device,), _ = compile_only_devices(get_target("a10g"), 1)
    labels = synthetic_host_batch(BATCH, SIZE)["labels"]
    steps = build_steps(training_config("tiny", "bfloat16", "none"), SIZE, make_mesh([device]), labels)
    lowered = steps.train_step.lower(steps.abstract_state, steps.abstract_batch(BATCH))
    one = compiled_memory(lowered.compile())
    assert one["argument_bytes"] == four["argument_bytes"] and one["alias_bytes"] == four["alias_bytes"]
    # The compile-only device cannot count FLOPs (a PJRT plugin): None, never an error or a 0.
    assert flops(lowered) is None


def test_flops_never_depend_on_the_device_counting_them():
    class NoCostAnalysis:
        def cost_analysis(self):
            raise NotImplementedError("Lowered.cost_analysis is not implemented for PJRT C API backends")

    assert flops(NoCostAnalysis()) is None
    labels = synthetic_host_batch(4, SIZE)["labels"]
    cfg = training_config("tiny", "float32", "none")
    train, infer = step_flops(cfg, SIZE, 4, labels), step_flops(cfg, SIZE, 4, labels, "inference")
    assert train > 2 * infer > 0  # backward ~ twice the forward


def test_planned_batch_takes_at_most_three_compiles():
    def affine(b):
        return 1_000_000 + 30_000 * b

    def curved(b):  # per-image memory creeping up with the batch: the line under-predicts
        return 1_000_000 + 30_000 * b + 40 * b * b

    def counted(bytes_for, calls):
        return lambda b: calls.append(b) or bytes_for(b)

    for budget in (affine(1) - 1, affine(3), affine(97) + 10, affine(1000)):
        calls = []
        plan = planned_batch(counted(affine, calls), budget, first=8)
        assert len(calls) <= 3 and plan["compiles"] == len(set(calls))
        brute = max((b for b in range(0, 2000) if b == 0 or affine(b) <= budget), default=0)
        assert plan["batch"] == brute
        assert plan["batch"] == 0 or affine(plan["batch"]) <= budget
    calls = []
    budget = curved(200) + 5
    plan = planned_batch(counted(curved, calls), budget, first=8)
    assert len(calls) <= 3
    assert plan["batch"] < 200 + 60  # the line's guess overshoots; the third compile catches it
    if plan["confirmed"]:
        assert curved(plan["batch"]) <= budget
    else:
        assert plan["batch"] not in plan["probes"] and curved(plan["batch"]) <= budget * 1.05


def test_every_target_figure_has_a_source():
    names = set()
    for key, t in targets().items():
        assert isinstance(t, GpuTarget) and t.key == key
        cited = {field.strip() for fields in t.sources for field in fields.split(",")}
        fields = ("compute_capability", "sm_count", "clock_ghz", "memory_bandwidth_gb_s", "l2_cache_mib", "memory_mib")
        assert set(fields) <= cited, (key, set(fields) - cited)
        assert t.sm_limits and t.sm_limits_source
        names.add(t.name)
    assert {"a10g", "l4", "a100-40gb", "a100-80gb", "h100", "h200"} <= set(targets())
    assert len(names) == len(targets())  # each real device maps back to one target
    assert gpu_target.target_for_device("NVIDIA A10G").key == "a10g"
    assert gpu_target.target_for_device("Tesla T4") is None


def test_versions_come_from_the_installed_plugin():
    versions = gpu_target.cuda_versions()
    assert versions["plugin"].startswith("jax-cuda12-plugin ")
    for key in ("cuda", "cudnn"):
        assert all(part.isdigit() for part in versions[key].split(".")), versions
        assert versions[f"{key}_source"] in ("installed library", f"{versions['plugin']} build")
    config = gpu_target.target_config(get_target("h100"), versions)
    major, minor, _ = versions["cudnn"].split(".")
    assert f"dnn_version_info {{ major: {major} minor: {minor}" in config
    assert "cuda_compute_capability { major: 9 minor: 0 }" in config
    assert f"device_memory_size: {81559 * 2**20}" in config


def test_bad_targets_get_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--out", str(tmp_path), "--target", "v100"])
    assert "unknown v100; choose from a10g, l4" in capsys.readouterr().err
    assert cli_main(["bench", "--out", str(tmp_path), "--target", "a10g", "--peers", "torch"]) == 2
    assert "no peers" in capsys.readouterr().err
    with pytest.raises(TargetError, match="unknown GPU target"):
        get_target("rtx9090")
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: (
            (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name))
            if name == "jax-cuda12-plugin"
            else real(name)
        ),
    )
    with pytest.raises(TargetError, match=r'pip install "jax\[cuda12-local\]"'):
        gpu_target.cuda_versions()


def test_the_budget_is_the_card_less_the_allowance():
    """Without --memory-budget-gb the plan's budget is the card's memory less the stated
    allowance, and the fraction JAX needs for it is said."""
    from cxrjax.bench.run import DEFAULT_ALLOWANCE_GB, BenchOptions, plan

    o = BenchOptions(out="x", arch="tiny", sizes=(SIZE,), batch=(BATCH,), targets=("a10g", "h100"), target_devices=4)
    specs = plan(o)
    assert [(s.task, s.target, s.target_devices) for s in specs] == [("compiled", "a10g", 4), ("compiled", "h100", 4)]
    assert all(s.allowance_bytes == int(DEFAULT_ALLOWANCE_GB * GIB) and s.memory_budget_bytes == 0 for s in specs)
    a10g = get_target("a10g")
    assert a10g.memory_bytes == 23028 * 2**20 and math.isclose(a10g.memory_bytes / GIB, 22.49, abs_tol=0.01)
    assert jax.devices()[0].platform == "cpu"  # the tests never reached for a GPU


@pytest.mark.slow
def test_what_holds_the_peak_is_read_from_xla_s_own_dump(tmp_path):
    """benchmarks/compiled_peak.py: the live buffers at the compiled peak add up to XLA's
    peak, which the compiled total (packed temporaries, arguments, outputs) covers."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compiled_peak.py"
    out = tmp_path / "peak"
    args = ["--target", "a10g", "--arch", "tiny", "--size", str(SIZE), "--batch", str(BATCH), "--remat", "all"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "compiled_peak.json").read_text())
    assert result["target"] == "NVIDIA A10G" and result["case"]["remat"] == "all"
    buffers = result["peak_buffers"]
    assert buffers and sum(b["bytes"] for b in buffers) == result["live_peak_bytes"]
    assert all(b["source"] for b in buffers) and buffers == sorted(buffers, key=lambda b: -b["bytes"])
    assert 0 < result["live_peak_bytes"] <= result["compiled_memory"]["total_bytes"]
    assert "live at the peak" in (out / "compiled_peak.md").read_text()
