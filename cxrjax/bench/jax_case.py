"""The cxrjax side: times the real jitted steps that `cxrjax train` runs.

The model, loss, optimizer, state and steps come from `base_config()` through
`build_model`, `make_loss`, `make_optimizer`, `state.initial_state` and
`make_train_step`, and inference is `forward.predict_batch` with the arguments the
trainer's validation passes, so what is timed is what training runs, not a copy. Each step is compiled ahead of
time (`lower().compile()`), which separates compile time from step time and gives XLA's
FLOP count (`cost_analysis`) and buffer assignment (`memory_analysis`).

FLOPs per image come from the lowered step (before XLA's optimizations), so they do not
depend on the backend; with remat, the re-computed forward is included, and
`model_flops_per_image` (what MFU uses) is taken from the same step without remat.

Saved activations per image (what remat controls) are counted from shapes by
`cxrjax.models.memory`, beside XLA's compiled figures and the allocator's peak.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax import forward
from cxrjax.bench.memory import PEAK_SOURCE, compiled_memory, device_peak_bytes, largest_batch, planned_batch
from cxrjax.bench.spec import SCALING_DEVICES, CaseSpec, empty_result
from cxrjax.bench.timing import time_steps
from cxrjax.config import base_config
from cxrjax.data.normalize import stats_for
from cxrjax.findings import NUM_FINDINGS
from cxrjax.mesh import DeviceBatches, batch_sharded, make_mesh, to_global
from cxrjax.models import build_model
from cxrjax.models.memory import saved_activation_bytes_per_image
from cxrjax.train import losses, optim
from cxrjax.train.state import TrainState, initial_state, state_shapes
from cxrjax.train.step import make_train_step


def training_config(arch: str, dtype: str, remat: str):
    """The default training recipe with the benchmarked model settings."""
    cfg = base_config()
    cfg.model.arch, cfg.model.dtype, cfg.model.remat = arch, dtype, remat
    return cfg


@dataclasses.dataclass(frozen=True)
class Steps:
    """The trainer's jitted training step and its one jitted inference
    (`forward.predict_batch`) for one config on one mesh, and how to make their state."""

    mesh: jax.sharding.Mesh
    size: int
    channels: int
    seed: int
    model: object
    tx: object
    stats: tuple  # (mean, std) per channel, as the trainer passes them
    train_step: object
    abstract_state: TrainState  # ShapeDtypeStructs with shardings, for lowering only

    def new_state(self) -> TrainState:
        return initial_state(
            self.model, self.tx, self.mesh, image_size=self.size, channels=self.channels, seed=self.seed
        )

    def infer_args(self, state, batch) -> tuple:
        """`forward.predict_batch`'s arguments, as the trainer's validation passes them."""
        return (self.model, *self.stats, state.variables, batch["image"])

    def lower(self, task: str, global_batch: int):
        """The training step (task "train") or the inference, lowered for `global_batch`."""
        batch = self.abstract_batch(global_batch)
        if task == "train":
            return self.train_step.lower(self.abstract_state, batch)
        return forward.predict_batch.lower(*self.infer_args(self.abstract_state, batch))

    def abstract_batch(self, global_batch: int) -> dict:
        data = batch_sharded(self.mesh)
        key = jax.dtypes.canonicalize_dtype(np.int64)  # what `to_global` makes of grain's int64 keys
        return {
            "image": jax.ShapeDtypeStruct((global_batch, self.size, self.size, 1), jnp.uint8, sharding=data),
            "labels": jax.ShapeDtypeStruct((global_batch, NUM_FINDINGS), jnp.float32, sharding=data),
            "key": jax.ShapeDtypeStruct((global_batch,), key, sharding=data),
        }


def build_steps(cfg, size: int, mesh, labels: np.ndarray) -> Steps:
    model = build_model(cfg.model)
    loss_fn = losses.make_loss(cfg.loss, labels.mean(0), labels.sum(0), len(labels))
    tx = optim.make_optimizer(cfg.optim, optim.make_schedule(cfg.optim, 1000, 100_000))
    mean, std = stats_for(cfg.data.normalization, cfg.model.in_channels)
    channels = cfg.model.in_channels
    abstract = state_shapes(model, tx, mesh, image_size=size, channels=channels, seed=cfg.seed)
    train_step = make_train_step(model, loss_fn, mesh, abstract, mean=mean, std=std, l2=cfg.loss.l2)
    return Steps(mesh, size, channels, cfg.seed, model, tx, (mean, std), train_step, abstract)


def synthetic_host_batch(global_batch: int, size: int, seed: int = 0) -> dict:
    """A batch shaped like the grain pipeline's: uint8 images, float32 labels, int64 keys."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (global_batch, size, size, 1), dtype=np.uint8),
        "labels": (rng.random((global_batch, NUM_FINDINGS)) < 0.1).astype(np.float32),
        "key": np.arange(global_batch, dtype=np.int64),
    }


def flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered computation, where its backend implements one."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # NotImplementedError on PJRT C API backends (the CUDA plugin), UNIMPLEMENTED
        return None
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    value = float(cost.get("flops", 0.0)) if cost else 0.0
    return value if value > 0 else None


FLOPS_SOURCE = "XLA cost analysis of the same step lowered for the CPU (unoptimized HLO; backend-independent)"


def step_flops(cfg, size: int, global_batch: int, labels: np.ndarray, task: str = "train") -> float | None:
    """FLOPs of one training (or inference) step of `cfg` at `global_batch`, counted from the
    step lowered for one CPU device: the same HLO on every backend, and it works where the
    device's own cost analysis does not (CUDA through the PJRT plugin, compile-only
    targets). Lowering only: nothing is compiled or run."""
    try:
        cpu = jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS without cpu: nothing to count on
        return None
    return flops(build_steps(cfg, size, make_mesh(cpu), labels).lower(task, global_batch))


def compile_timed(jitted, *args):
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - start


def _per_image(value, batch: int):
    return None if value is None else value / batch


def _memory_fields(compiled, devices, batch_per_device: int) -> dict:
    memory = compiled_memory(compiled)
    peak = device_peak_bytes(devices)
    resident = peak if peak is not None else (memory or {}).get("total_bytes")
    return {
        "compiled_memory": memory,
        "peak_bytes": peak,
        "peak_bytes_source": PEAK_SOURCE if peak is not None else None,
        "bytes_per_image": _per_image(resident, batch_per_device),
        "bytes_per_image_source": "peak_bytes" if peak is not None else "compiled total_bytes",
    }


class _Trainer:
    """Carries the donated state from one compiled training step to the next."""

    def __init__(self, compiled, state):
        self.compiled, self.state = compiled, state

    def step(self, batch):
        self.state, metrics = self.compiled(self.state, batch)
        return metrics


def _train_flops_per_image(spec: CaseSpec, global_batch: int, labels) -> tuple[float | None, float | None]:
    """Training FLOPs per image as run (with remat's recomputation) and as the model needs
    them (the same step without remat: what MFU counts)."""
    cfg = training_config(spec.arch, spec.dtype, spec.remat)
    run = _per_image(step_flops(cfg, spec.size, global_batch, labels), global_batch)
    if spec.remat == "none":
        return run, run
    plain = training_config(spec.arch, spec.dtype, "none")
    return run, _per_image(step_flops(plain, spec.size, global_batch, labels), global_batch)


def measure_case(spec: CaseSpec) -> dict:
    """Inference and training on all local devices; optionally the grain-fed step."""
    devices = jax.devices()
    mesh = make_mesh(devices)
    n, global_batch = len(devices), spec.batch * len(devices)
    host = synthetic_host_batch(global_batch, spec.size)
    cfg = training_config(spec.arch, spec.dtype, spec.remat)
    steps = build_steps(cfg, spec.size, mesh, host["labels"])
    batch = to_global(host, mesh)
    state = steps.new_state()
    common = {
        "status": "ok",
        "devices": n,
        "global_batch": global_batch,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
    }

    rows = []
    if spec.inference:  # first: its allocator peak is read before training raises it
        # The trainer's own jitted inference, with the arguments its validation passes.
        _, compiled, compile_s = compile_timed(forward.predict_batch, *steps.infer_args(state, batch))
        timing = time_steps(
            functools.partial(compiled, *steps.infer_args(state, batch)[1:]), jax.block_until_ready, spec.steps
        )
        infer_flops = _per_image(step_flops(cfg, spec.size, global_batch, host["labels"], "inference"), global_batch)
        rows.append(
            spec.row(
                task="inference",
                **common,
                compile_s=compile_s,
                **timing.fields(global_batch, n),
                flops_per_image=infer_flops,
                model_flops_per_image=infer_flops,
                flops_source=FLOPS_SOURCE,
                **_memory_fields(compiled, devices, spec.batch),
            )
        )

    _, compiled, compile_s = compile_timed(steps.train_step, state, batch)
    trainer = _Trainer(compiled, state)
    state = None  # donated by the first step; the trainer holds the live state
    timing = time_steps(functools.partial(trainer.step, batch), jax.block_until_ready, spec.steps)
    train_flops, model_flops = _train_flops_per_image(spec, global_batch, host["labels"])
    train = spec.row(
        task="train",
        **common,
        compile_s=compile_s,
        **timing.fields(global_batch, n),
        flops_per_image=train_flops,
        model_flops_per_image=model_flops,
        flops_source=FLOPS_SOURCE,
        saved_activation_bytes_per_image=saved_activation_bytes_per_image(build_model(cfg.model), spec.size),
        **_memory_fields(compiled, devices, spec.batch),
    )
    rows.append(train)

    if spec.prepared:
        rows.append(_measure_fed(spec, trainer, mesh, common, train))
    return {**empty_result(), "measurements": rows}


def _measure_fed(spec: CaseSpec, trainer: _Trainer, mesh, common: dict, synthetic: dict) -> dict:
    """The same compiled step fed by the real grain pipeline over `spec.prepared`, its
    batches sent ahead to the devices as the trainer's are (`DeviceBatches`)."""
    from cxrjax.data.augment import AugmentConfig
    from cxrjax.data.pipeline import ShardedRecords, make_loader
    from cxrjax.mesh import per_process_batch

    global_batch = common["global_batch"]
    source = ShardedRecords(Path(spec.prepared) / "train")
    if len(source) < global_batch:
        reason = f"{spec.prepared}/train has {len(source)} images, fewer than one batch of {global_batch}"
        return spec.row(task="train_fed", **{**common, "status": "skipped"}, reason=reason)
    loader = make_loader(
        source,
        batch_size=per_process_batch(global_batch, mesh),
        image_size=spec.size,
        seed=0,
        train=True,
        augment=AugmentConfig(),
        workers=spec.workers,
    )
    batches = DeviceBatches(iter(loader), mesh)  # fed as the trainer feeds its steps
    timing = time_steps(lambda: trainer.step(next(batches)), jax.block_until_ready, spec.steps)
    fields = timing.fields(global_batch, common["devices"])
    fraction = fields["images_per_s"] / synthetic["images_per_s"]
    return spec.row(
        task="train_fed",
        **common,
        **fields,
        prepared=spec.prepared,
        workers=spec.workers,
        synthetic_images_per_s=synthetic["images_per_s"],
        fed_fraction=fraction,
        input_bound=bool(fraction < 0.9),
    )


def train_step_bytes(cfg, size: int, devices, labels):
    """Batch per device -> bytes XLA assigns to the training step compiled on `devices` (a
    real device, or compile-only ones of a GPU target), memoized. Keeps each executable
    (`bytes_for.compiled[batch]`, so the answer can be run), its memory and compile time."""
    steps = build_steps(cfg, size, make_mesh(devices), labels)
    executables, memories, seconds = {}, {}, {}

    @functools.cache
    def bytes_for(batch: int) -> int:
        start = time.perf_counter()
        compiled = steps.lower("train", batch * len(devices)).compile()
        seconds[batch] = time.perf_counter() - start
        memory = compiled_memory(compiled)
        if memory is None:
            raise RuntimeError(f"{devices[0].platform} gives no memory analysis for compiled steps")
        executables[batch], memories[batch] = compiled, memory
        return memory["total_bytes"]

    bytes_for.compiled, bytes_for.memory, bytes_for.seconds, bytes_for.steps = executables, memories, seconds, steps
    return bytes_for


def run_planned_batch(bytes_for, batch: int, size: int, steps: int = 2) -> dict:
    """Run the compiled step at the planned batch: does the plan hold on this device, and
    what does the allocator reach against what XLA planned?"""
    plan = bytes_for.steps
    try:
        state = plan.new_state()
        host = synthetic_host_batch(batch, size)
        trainer = _Trainer(bytes_for.compiled[batch], state)
        for _ in range(steps):
            jax.block_until_ready(trainer.step(to_global(host, plan.mesh)))
    except Exception as e:  # RESOURCE_EXHAUSTED: the plan did not hold
        return {"planned_batch_ran": False, "planned_batch_error": str(e).splitlines()[0][:300]}
    return {"planned_batch_ran": True, "planned_batch_peak_bytes": device_peak_bytes(plan.mesh.devices.flat)}


def measure_max_batch(spec: CaseSpec) -> dict:
    """Largest per-device training batch whose compiled step fits the budget: compiled,
    then run at that batch to check the plan (the allocator's peak beside the compiled total)."""
    device = jax.devices()[0]
    labels = synthetic_host_batch(spec.batch, spec.size)["labels"]
    bytes_for = train_step_bytes(training_config(spec.arch, spec.dtype, spec.remat), spec.size, [device], labels)
    found = largest_batch(bytes_for, spec.memory_budget_bytes, first=spec.batch)
    ran = run_planned_batch(bytes_for, found["batch"], spec.size) if found["batch"] else {}
    row = spec.row(
        task="max_batch",
        status="ok",
        device_kind=device.device_kind,
        platform=device.platform,
        memory_source="compiled.memory_analysis(): arguments + outputs - aliased + temporaries",
        **found,
        **ran,
    )
    return {**empty_result(), "max_batch": [row]}


def measure_scaling(spec: CaseSpec) -> dict:
    """Training throughput on 1, 2, 4 and 8 devices at a fixed per-device batch."""
    devices = jax.devices()
    host = synthetic_host_batch(spec.batch * max(SCALING_DEVICES), spec.size)
    cfg = training_config(spec.arch, spec.dtype, spec.remat)
    rows = []
    for n in SCALING_DEVICES:
        common = {
            "task": "scaling",
            "devices": n,
            "global_batch": spec.batch * n,
            "device_kind": devices[0].device_kind,
            "platform": devices[0].platform,
        }
        if n > len(devices):
            rows.append(spec.row(**common, status="skipped", reason=f"only {len(devices)} devices"))
            continue
        mesh = make_mesh(devices[:n])
        part = {k: v[: spec.batch * n] for k, v in host.items()}
        steps = build_steps(cfg, spec.size, mesh, part["labels"])
        batch = to_global(part, mesh)
        _, compiled, compile_s = compile_timed(
            steps.train_step, steps.abstract_state, steps.abstract_batch(spec.batch * n)
        )
        trainer = _Trainer(compiled, steps.new_state())
        timing = time_steps(functools.partial(trainer.step, batch), jax.block_until_ready, spec.steps)
        rows.append(spec.row(**common, status="ok", compile_s=compile_s, **timing.fields(spec.batch * n, n)))
    return {**empty_result(), "scaling": rows}


COMPILED_NOTE = (
    "compiled for the target, not measured: XLA's buffer assignment of the training step; nothing ran, "
    "and the compile-only convolutions carry no cuDNN workspace (the allowance stands for it)"
)


def measure_compiled(spec: CaseSpec) -> dict:
    """The training step compiled for a GPU target (present or not): compiled memory at
    `spec.batch` per device, FLOPs, compile time, and the largest batch per device under the
    budget (the card's memory less the allowance, unless a budget is given) in <= 3 compiles."""
    from cxrjax.bench.gpu_target import compile_only_devices, get_target, target_for_device

    if spec.target == "auto":  # the target that describes the GPU this runs on
        kind = jax.devices()[0].device_kind
        target = target_for_device(kind)
        if target is None:
            reason = f"no GPU target describes this device ({kind})"
            return {**empty_result(), "compiled": [spec.row(task="compiled", status="skipped", reason=reason)]}
    else:
        target = get_target(spec.target)
    devices, versions = compile_only_devices(target, spec.target_devices)
    n = len(devices)
    labels = synthetic_host_batch(spec.batch, 32)["labels"]
    cfg = training_config(spec.arch, spec.dtype, spec.remat)
    bytes_for = train_step_bytes(cfg, spec.size, devices, labels)
    memories, seconds = bytes_for.memory, bytes_for.seconds
    budget = spec.memory_budget_bytes or target.memory_bytes - spec.allowance_bytes
    plan = planned_batch(bytes_for, budget, first=spec.batch)
    memory = memories[spec.batch]
    train_flops, model_flops = _train_flops_per_image(spec, spec.batch * n, labels)
    row = spec.row(
        task="compiled",
        status="ok",
        target=target.key,
        device_kind=target.name,
        platform="compiled",
        devices=n,
        global_batch=spec.batch * n,
        cuda=versions["cuda"],
        cudnn=versions["cudnn"],
        cuda_versions=versions,
        compiled_memory=memory,
        bytes_per_image=memory["total_bytes"] / spec.batch,
        compile_s=seconds[spec.batch],
        compile_s_source="this host's wall clock for lower() + compile()",
        compile_s_by_batch={str(b): s for b, s in sorted(seconds.items())},
        compiled_memory_by_batch={str(b): m for b, m in sorted(memories.items())},
        flops_per_image=train_flops,
        model_flops_per_image=model_flops,
        flops_source=FLOPS_SOURCE,
        saved_activation_bytes_per_image=saved_activation_bytes_per_image(build_model(cfg.model), spec.size),
        card_memory_bytes=target.memory_bytes,
        allowance_bytes=0 if spec.memory_budget_bytes else spec.allowance_bytes,
        budget_source="given" if spec.memory_budget_bytes else "card memory - allowance",
        xla_mem_fraction=budget / target.memory_bytes,
        largest_batch=plan,
        note=COMPILED_NOTE,
    )
    return {**empty_result(), "compiled": [row]}
