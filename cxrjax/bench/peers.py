"""Peers measured in the same run, on the same device, with the same timing protocol.

- torch / torch_compile: torchvision's DenseNet (densenet121 is `DenseNet(32, (6, 12, 24,
  16), 64)`; the same class builds every cxrjax arch, `tiny` included), channels_last,
  bfloat16 autocast for the bfloat16 cases, Adam (fused on CUDA), BCE-with-logits. The
  uint8 batch is normalized on the device inside the step, as cxrjax does. Any cxrjax remat
  but "none" maps to torchvision's `memory_efficient=True` (checkpointed dense layers, its
  only option). The largest batch under a memory budget is a capped trial: the CUDA
  allocator is limited to the budget and real training steps are run at growing batches
  until one runs out of memory (eager torch only: torch.compile would recompile for each
  batch). torch_compile
  compiles preprocessing + forward + loss with `torch.compile` (backward through
  AOTAutograd); the optimizer step stays eager, as usual.
- keras: `keras.applications.DenseNet121/169/201` on the JAX backend, compiled with
  `jit_compile=True`, `mixed_bfloat16` policy for the bfloat16 cases, `train_on_batch` /
  `predict_on_batch` on device-resident inputs. Keras has no remat and no `tiny`.

They live in the package (imported lazily, in their own worker process) so that
`cxrjax bench --peers ...` can run them; torch, torchvision and keras stay optional.
"""

from __future__ import annotations

import os

import numpy as np

from cxrjax.bench.memory import largest_batch
from cxrjax.bench.spec import CaseSpec, empty_result, not_measured
from cxrjax.bench.timing import time_steps
from cxrjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from cxrjax.findings import NUM_FINDINGS
from cxrjax.models.densenet import arch_spec

KERAS_APPLICATIONS = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201"}


def skipped(spec: CaseSpec, reason: str) -> dict:
    return not_measured(spec, "skipped", reason)


def _host_batch(spec: CaseSpec, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = batch or spec.batch
    images = rng.integers(0, 256, (batch, spec.size, spec.size, 1), dtype=np.uint8)
    labels = (rng.random((batch, NUM_FINDINGS)) < 0.1).astype(np.float32)
    return images, labels


class _TorchDenseNet:
    """torchvision's DenseNet for one case: the model, its optimizer and the two steps."""

    def __init__(self, spec: CaseSpec, torch, torchvision):
        self.torch, self.spec = torch, spec
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        a = arch_spec(spec.arch)
        model = torchvision.models.DenseNet(
            a.growth_rate,
            a.block_config,
            a.init_features,
            num_classes=NUM_FINDINGS,
            memory_efficient=spec.remat != "none",
        )
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, eps=1e-7, fused=self.cuda)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        compiled = spec.framework == "torch_compile"
        self.forward = torch.compile(self.logits_of) if compiled else self.logits_of
        self.loss_fn = torch.compile(self.loss_of) if compiled else self.loss_of

    def batch(self, size: int | None = None):
        host_images, host_labels = _host_batch(self.spec, size)
        images = self.torch.from_numpy(host_images).permute(0, 3, 1, 2).contiguous().to(self.device)
        return images, self.torch.from_numpy(host_labels).to(self.device)

    def logits_of(self, x):
        torch = self.torch
        x = x.float().div(255.0).expand(-1, 3, -1, -1)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec.dtype == "bfloat16"):
            return self.model(x).float()

    def loss_of(self, x, y):
        return self.torch.nn.functional.binary_cross_entropy_with_logits(self.logits_of(x), y)

    def infer(self, images):
        with self.torch.inference_mode():
            return self.torch.sigmoid(self.forward(images))

    def train(self, images, labels):
        loss = self.loss_fn(images, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def wait(self, _=None):
        if self.cuda:
            self.torch.cuda.synchronize()


def _import_torch(spec: CaseSpec):
    try:
        import torch
        import torchvision
    except Exception as e:  # noqa: BLE001 - not installed, or a torchvision built for another torch
        return None, skipped(spec, f"torch/torchvision not usable: {type(e).__name__}: {e}")
    return _TorchDenseNet(spec, torch, torchvision), None


def measure_torch(spec: CaseSpec) -> dict:
    if spec.task == "max_batch":
        return measure_torch_max_batch(spec)
    net, not_usable = _import_torch(spec)
    if net is None:
        return not_usable
    torch, cuda = net.torch, net.cuda
    images, labels = net.batch()

    def peak() -> dict:
        if not cuda:
            return {"peak_bytes": None, "peak_bytes_source": None, "bytes_per_image": None}
        value = int(torch.cuda.max_memory_allocated())
        return {
            "peak_bytes": value,
            "peak_bytes_source": "torch.cuda.max_memory_allocated()",
            "bytes_per_image": value / spec.batch,
            "bytes_per_image_source": "peak_bytes",
        }

    common = {
        "status": "ok",
        "devices": 1,
        "global_batch": spec.batch,
        "platform": "gpu" if cuda else "cpu",
        "device_kind": torch.cuda.get_device_name(net.device) if cuda else "cpu",
        "channels_last": True,
        "autocast_bfloat16": spec.dtype == "bfloat16",
        "memory_efficient": spec.remat != "none",
    }
    rows = []
    steps = (
        ("inference", lambda: net.infer(images), net.model.eval),
        ("train", lambda: net.train(images, labels), net.model.train),
    )
    for task, step, mode in steps[0 if spec.inference else 1 :]:
        mode()
        if cuda:
            torch.cuda.reset_peak_memory_stats(net.device)
        timing = time_steps(step, net.wait, spec.steps)
        rows.append(spec.row(task=task, **common, **timing.fields(spec.batch, 1), **peak()))
    return {**empty_result(), "measurements": rows}


def measure_torch_max_batch(spec: CaseSpec) -> dict:
    """The capped trial: the allocator limited to the budget, real steps at growing batches."""
    if spec.framework != "torch":
        return skipped(spec, "the capped trial runs eager torch only (torch.compile recompiles per batch)")
    net, not_usable = _import_torch(spec)
    if net is None:
        return not_usable
    torch = net.torch
    if not net.cuda:
        return skipped(spec, "the capped trial needs CUDA: it limits and reads the CUDA allocator")
    total = torch.cuda.get_device_properties(net.device).total_memory
    if spec.memory_budget_bytes > total:
        return skipped(spec, f"the budget exceeds the device's {total} bytes")
    torch.cuda.set_per_process_memory_fraction(spec.memory_budget_bytes / total, net.device)
    net.model.train()

    def bytes_for(batch: int) -> int:
        images = labels = None
        try:
            images, labels = net.batch(batch)
            torch.cuda.reset_peak_memory_stats(net.device)
            net.train(images, labels)
            net.wait()
            return int(torch.cuda.max_memory_allocated(net.device))
        except torch.cuda.OutOfMemoryError:
            net.optimizer.zero_grad(set_to_none=True)
            return spec.memory_budget_bytes + 1
        finally:
            del images, labels
            torch.cuda.empty_cache()

    found = largest_batch(bytes_for, spec.memory_budget_bytes, first=spec.batch)
    row = spec.row(
        task="max_batch",
        status="ok",
        platform="gpu",
        device_kind=torch.cuda.get_device_name(net.device),
        memory_source="torch.cuda.max_memory_allocated() of a real step, allocator capped at the budget "
        "(set_per_process_memory_fraction); out of memory counts as over the budget",
        **found,
    )
    return {**empty_result(), "max_batch": [row]}


def measure_keras(spec: CaseSpec) -> dict:
    if spec.arch not in KERAS_APPLICATIONS:
        return skipped(spec, f"keras.applications has no DenseNet matching arch {spec.arch!r}")
    if spec.remat != "none":
        return skipped(spec, "keras.applications DenseNet has no rematerialization option")
    if spec.task != "step":
        return skipped(spec, f"the Keras peer measures steps only, not {spec.task}")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except Exception as e:  # noqa: BLE001 - a broken install is a skipped peer, not a failed run
        return skipped(spec, f"keras not usable: {type(e).__name__}: {e}")
    if keras.backend.backend() != "jax":
        return skipped(spec, f"KERAS_BACKEND is {keras.backend.backend()!r}; the peer is Keras on JAX")
    import jax

    from cxrjax.bench.memory import PEAK_SOURCE, device_peak_bytes

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if spec.dtype == "bfloat16" else "float32")
    build = getattr(keras.applications, KERAS_APPLICATIONS[spec.arch])
    model = build(weights=None, input_shape=(spec.size, spec.size, 3), classes=NUM_FINDINGS, classifier_activation=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        jit_compile=True,
    )
    host_images, host_labels = _host_batch(spec)
    x = (np.repeat(host_images, 3, axis=-1) / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    x, y = jax.device_put(x.astype(np.float32)), jax.device_put(host_labels)
    devices = jax.local_devices()[:1]
    common = {
        "status": "ok",
        "devices": 1,
        "global_batch": spec.batch,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "keras_policy": keras.mixed_precision.global_policy().name,
        "input_preprocessing": "normalized on the host once (not in the timed step)",
    }
    rows = []
    steps = (("inference", lambda: model.predict_on_batch(x)), ("train", lambda: model.train_on_batch(x, y)))
    for task, step in steps[0 if spec.inference else 1 :]:  # both return host values, so each step is waited for
        timing = time_steps(step, lambda _: None, spec.steps)
        peak = device_peak_bytes(devices)
        rows.append(
            spec.row(
                task=task,
                **common,
                **timing.fields(spec.batch, 1),
                peak_bytes=peak,
                peak_bytes_source=PEAK_SOURCE if peak is not None else None,
                bytes_per_image=None if peak is None else peak / spec.batch,
                bytes_per_image_source="peak_bytes" if peak is not None else None,
            )
        )
    return {**empty_result(), "measurements": rows}


def torch_saved_activation_bytes_per_image(arch: str, size: int, dtype: str, memory_efficient: bool) -> int:
    """What torchvision's DenseNet keeps for the backward pass, per image: every tensor
    autograd saves outside the checkpointed bottlenecks, plus each dense layer's output
    (what `memory_efficient=True` keeps instead), by distinct storage, parameters excluded.
    The difference between one and two images takes out what is per step (bf16 weight
    copies). A lower bound of torch's peak memory per image; runs on the CPU."""
    import torch

    spec = CaseSpec(
        "torch", arch, size, dtype, "dense_layers" if memory_efficient else "none", batch=2, steps=1, inference=False
    )
    net, not_usable = _import_torch(spec)
    if net is None:
        raise RuntimeError(not_usable["measurements"][0]["reason"])
    params = {p.untyped_storage().data_ptr() for p in net.model.parameters()}

    def saved_bytes(batch: int) -> int:
        seen: dict[int, int] = {}

        def keep(t):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in params:
                    seen[storage.data_ptr()] = storage.nbytes()
            return t

        layers = [
            m.register_forward_hook(lambda _m, _i, out: keep(out))
            for m in net.model.modules()
            if type(m).__name__ == "_DenseLayer"
        ]
        images, labels = net.batch(batch)
        net.model.train()
        try:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = net.loss_of(images, labels)
        finally:
            for hook in layers:
                hook.remove()
        del loss
        return sum(seen.values())

    return saved_bytes(2) - saved_bytes(1)
