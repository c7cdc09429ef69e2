"""Peers measured in the same run, on the same device, with the same timing protocol.

- torch / torch_compile: torchvision's DenseNet (densenet121 is `DenseNet(32, (6, 12, 24,
  16), 64)`; the same class builds every cxrjax arch, `tiny` included), channels_last,
  bfloat16 autocast for the bfloat16 cases, Adam (fused on CUDA), BCE-with-logits. The
  uint8 batch is normalized on the device inside the step, as cxrjax does. remat on maps
  to torchvision's `memory_efficient=True` (checkpointed dense layers). torch_compile
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

from cxrjax.bench.spec import CaseSpec, not_measured
from cxrjax.bench.timing import time_steps
from cxrjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from cxrjax.findings import NUM_FINDINGS
from cxrjax.models.densenet import arch_spec

KERAS_APPLICATIONS = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201"}


def skipped(spec: CaseSpec, reason: str) -> dict:
    return not_measured(spec, "skipped", reason)


def _host_batch(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (spec.batch, spec.size, spec.size, 1), dtype=np.uint8)
    labels = (rng.random((spec.batch, NUM_FINDINGS)) < 0.1).astype(np.float32)
    return images, labels


def measure_torch(spec: CaseSpec) -> dict:
    try:
        import torch
        import torchvision
    except Exception as e:  # noqa: BLE001 - not installed, or a torchvision built for another torch
        return skipped(spec, f"torch/torchvision not usable: {type(e).__name__}: {e}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    a = arch_spec(spec.arch)
    model = torchvision.models.DenseNet(a.growth_rate, a.block_config, a.init_features,
                                        num_classes=NUM_FINDINGS, memory_efficient=spec.remat)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=cuda)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    host_images, host_labels = _host_batch(spec)
    images = torch.from_numpy(host_images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(host_labels).to(device)
    bf16 = spec.dtype == "bfloat16"

    def logits_of(x):
        x = x.float().div(255.0).expand(-1, 3, -1, -1)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x).float()

    def loss_of(x, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits_of(x), y)

    compiled = spec.framework == "torch_compile"
    forward = torch.compile(logits_of) if compiled else logits_of
    loss_fn = torch.compile(loss_of) if compiled else loss_of

    def wait(_):
        if cuda:
            torch.cuda.synchronize()

    def peak() -> dict:
        if not cuda:
            return {"peak_bytes": None, "peak_bytes_source": None, "bytes_per_image": None}
        value = int(torch.cuda.max_memory_allocated())
        return {"peak_bytes": value, "peak_bytes_source": "torch.cuda.max_memory_allocated()",
                "bytes_per_image": value / spec.batch, "bytes_per_image_source": "peak_bytes"}

    def infer():
        with torch.inference_mode():
            return torch.sigmoid(forward(images))

    def train():
        loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    common = {"status": "ok", "devices": 1, "global_batch": spec.batch, "platform": "gpu" if cuda else "cpu",
              "device_kind": torch.cuda.get_device_name(device) if cuda else "cpu",
              "channels_last": True, "autocast_bfloat16": bf16}
    rows = []
    for task, step, mode in (("inference", infer, model.eval), ("train", train, model.train)):
        mode()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_steps(step, wait, spec.steps)
        rows.append(spec.row(task=task, **common, **timing.fields(spec.batch, 1), **peak()))
    return {"measurements": rows, "max_batch": [], "scaling": []}


def measure_keras(spec: CaseSpec) -> dict:
    if spec.arch not in KERAS_APPLICATIONS:
        return skipped(spec, f"keras.applications has no DenseNet matching arch {spec.arch!r}")
    if spec.remat:
        return skipped(spec, "keras.applications DenseNet has no rematerialization option")
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
    model = build(weights=None, input_shape=(spec.size, spec.size, 3), classes=NUM_FINDINGS,
                  classifier_activation=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=True)
    host_images, host_labels = _host_batch(spec)
    x = (np.repeat(host_images, 3, axis=-1) / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    x, y = jax.device_put(x.astype(np.float32)), jax.device_put(host_labels)
    devices = jax.local_devices()[:1]
    common = {"status": "ok", "devices": 1, "global_batch": spec.batch, "platform": devices[0].platform,
              "device_kind": devices[0].device_kind, "keras_policy": keras.mixed_precision.global_policy().name,
              "input_preprocessing": "normalized on the host once (not in the timed step)"}
    rows = []
    steps = (("inference", lambda: model.predict_on_batch(x)), ("train", lambda: model.train_on_batch(x, y)))
    for task, step in steps:  # both return host values, so each step is waited for
        timing = time_steps(step, lambda _: None, spec.steps)
        peak = device_peak_bytes(devices)
        rows.append(spec.row(task=task, **common, **timing.fields(spec.batch, 1), peak_bytes=peak,
                             peak_bytes_source=PEAK_SOURCE if peak is not None else None,
                             bytes_per_image=None if peak is None else peak / spec.batch,
                             bytes_per_image_source="peak_bytes" if peak is not None else None))
    return {"measurements": rows, "max_batch": [], "scaling": []}
