"""The cxrjax side: times the real jitted steps that `cxrjax train` runs.

The model, loss, optimizer, state and steps come from `base_config()` through
`build_model`, `make_loss`, `make_optimizer`, `TrainState.create` and `make_steps`, so
what is timed is the training step itself, not a copy. Each step is compiled ahead of
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

from cxrjax.bench.memory import PEAK_SOURCE, compiled_memory, device_peak_bytes, largest_batch
from cxrjax.bench.spec import SCALING_DEVICES, CaseSpec
from cxrjax.bench.timing import time_steps
from cxrjax.data.normalize import stats_for
from cxrjax.findings import NUM_FINDINGS
from cxrjax.mesh import batch_sharded, make_mesh, replicated, to_global
from cxrjax.models import build_model
from cxrjax.models.memory import saved_activation_bytes_per_image
from cxrjax.train import losses, optim
from cxrjax.train.defaults import base_config
from cxrjax.train.state import TrainState
from cxrjax.train.step import make_steps


def training_config(arch: str, dtype: str, remat: str):
    """The default training recipe with the benchmarked model settings."""
    cfg = base_config()
    cfg.model.arch, cfg.model.dtype, cfg.model.remat = arch, dtype, remat
    return cfg


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted steps of one config on one mesh, and how to make their state."""

    mesh: jax.sharding.Mesh
    size: int
    channels: int
    train_step: object
    eval_step: object
    init: object  # key -> TrainState, jitted with the state's shardings
    abstract_state: TrainState  # ShapeDtypeStructs with shardings, for lowering only

    def new_state(self, seed: int = 0) -> TrainState:
        return self.init(jax.random.PRNGKey(seed))

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
    dummy = jnp.zeros((1, size, size, cfg.model.in_channels), jnp.float32)

    def create(key):
        return TrainState.create(model.init(key, dummy, train=False), tx, cfg.seed)

    shapes = jax.eval_shape(create, jax.random.PRNGKey(0))
    sharding = jax.tree.map(lambda _: replicated(mesh), shapes)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding)
    train_step, eval_step = make_steps(model, loss_fn, mesh, sharding, mean=mean, std=std, l2=cfg.loss.l2)
    return Steps(
        mesh, size, cfg.model.in_channels, train_step, eval_step, jax.jit(create, out_shardings=sharding), abstract
    )


def synthetic_host_batch(global_batch: int, size: int, seed: int = 0) -> dict:
    """A batch shaped like the grain pipeline's: uint8 images, float32 labels, int64 keys."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (global_batch, size, size, 1), dtype=np.uint8),
        "labels": (rng.random((global_batch, NUM_FINDINGS)) < 0.1).astype(np.float32),
        "key": np.arange(global_batch, dtype=np.int64),
    }


def flops(lowered) -> float | None:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    value = float(cost.get("flops", 0.0)) if cost else 0.0
    return value if value > 0 else None


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


def _model_train_flops(spec: CaseSpec, steps: Steps, global_batch: int, labels) -> float | None:
    """Training FLOPs of the same step without remat: the work the model needs."""
    plain = build_steps(training_config(spec.arch, spec.dtype, "none"), spec.size, steps.mesh, labels)
    return _per_image(
        flops(plain.train_step.lower(plain.abstract_state, plain.abstract_batch(global_batch))), global_batch
    )


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
        lowered, compiled, compile_s = compile_timed(steps.eval_step, state, batch)
        timing = time_steps(functools.partial(compiled, state, batch), jax.block_until_ready, spec.steps)
        infer_flops = _per_image(flops(lowered), global_batch)
        rows.append(
            spec.row(
                task="inference",
                **common,
                compile_s=compile_s,
                **timing.fields(global_batch, n),
                flops_per_image=infer_flops,
                model_flops_per_image=infer_flops,
                **_memory_fields(compiled, devices, spec.batch),
            )
        )

    lowered, compiled, compile_s = compile_timed(steps.train_step, state, batch)
    trainer = _Trainer(compiled, state)
    state = None  # donated by the first step; the trainer holds the live state
    timing = time_steps(functools.partial(trainer.step, batch), jax.block_until_ready, spec.steps)
    train_flops = _per_image(flops(lowered), global_batch)
    plain = spec.remat == "none"
    model_flops = train_flops if plain else _model_train_flops(spec, steps, global_batch, host["labels"])
    train = spec.row(
        task="train",
        **common,
        compile_s=compile_s,
        **timing.fields(global_batch, n),
        flops_per_image=train_flops,
        model_flops_per_image=model_flops,
        saved_activation_bytes_per_image=saved_activation_bytes_per_image(build_model(cfg.model), spec.size),
        **_memory_fields(compiled, devices, spec.batch),
    )
    rows.append(train)

    if spec.prepared:
        rows.append(_measure_fed(spec, trainer, mesh, common, train))
    return {"measurements": rows, "max_batch": [], "scaling": []}


def _measure_fed(spec: CaseSpec, trainer: _Trainer, mesh, common: dict, synthetic: dict) -> dict:
    """The same compiled step fed by the real grain pipeline over `spec.prepared`."""
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
    batches = iter(loader)
    timing = time_steps(lambda: trainer.step(to_global(next(batches), mesh)), jax.block_until_ready, spec.steps)
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


def train_step_bytes(arch: str, size: int, dtype: str, remat: str, device, labels):
    """batch -> bytes XLA assigns to the training step compiled for one device (memoized)."""
    steps = build_steps(training_config(arch, dtype, remat), size, make_mesh([device]), labels)

    @functools.cache
    def bytes_for(batch: int) -> int:
        compiled = steps.train_step.lower(steps.abstract_state, steps.abstract_batch(batch)).compile()
        memory = compiled_memory(compiled)
        if memory is None:
            raise RuntimeError(f"{device.platform} gives no memory analysis for compiled steps")
        return memory["total_bytes"]

    return bytes_for


def measure_max_batch(spec: CaseSpec) -> dict:
    """Largest per-device training batch whose compiled step fits the budget: compiled,
    never run, so an A10G's 24 GiB can be searched on a larger card of the same backend."""
    device = jax.devices()[0]
    labels = synthetic_host_batch(spec.batch, spec.size)["labels"]
    bytes_for = train_step_bytes(spec.arch, spec.size, spec.dtype, spec.remat, device, labels)
    found = largest_batch(bytes_for, spec.memory_budget_bytes, first=spec.batch)
    row = spec.row(
        task="max_batch",
        status="ok",
        device_kind=device.device_kind,
        platform=device.platform,
        memory_source="compiled.memory_analysis(): arguments + outputs - aliased + temporaries",
        **found,
    )
    return {"measurements": [], "max_batch": [row], "scaling": []}


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
        abstract_batch = steps.abstract_batch(spec.batch * n)
        _, compiled, compile_s = compile_timed(steps.train_step, steps.abstract_state, abstract_batch)
        trainer = _Trainer(compiled, steps.new_state())
        timing = time_steps(functools.partial(trainer.step, batch), jax.block_until_ready, spec.steps)
        rows.append(spec.row(**common, status="ok", compile_s=compile_s, **timing.fields(spec.batch * n, n)))
    return {"measurements": [], "max_batch": [], "scaling": rows}
