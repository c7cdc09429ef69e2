"""Peak dense FLOP/s of the accelerators cxrjax is benchmarked on, and library versions.

MFU divides the model's FLOPs per second by the peak below. Only devices listed here get
an MFU; anything else (a CPU, an unlisted GPU) gets null rather than a guess.

Peaks are dense (NVIDIA's headline tensor figures are with 2:4 sparsity; these are half).
bfloat16 uses the BF16 tensor-core peak. float32 uses the TF32 tensor-core peak: JAX's
default matmul/convolution precision and cuDNN's default convolutions may run float32
through TF32 on Ampere and Hopper, so that is the ceiling a float32 step can reach.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    match: str  # lower-case substring of the CUDA device name / JAX device_kind
    bfloat16: float  # FLOP/s, dense
    float32: float  # FLOP/s, dense TF32 tensor core
    source: str


H100_SOURCE = "NVIDIA H100 Tensor Core GPU datasheet (sparse figures halved)"
H200_SOURCE = "NVIDIA H200 Tensor Core GPU datasheet (sparse figures halved)"
# Order matters: the first entry whose `match` occurs in the device name wins.
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 PCIe", "h100 pcie", 756.5 * TERA, 378.0 * TERA, H100_SOURCE),
    DevicePeak("H100 NVL", "h100 nvl", 835.5 * TERA, 417.5 * TERA, H100_SOURCE),
    DevicePeak("H100 SXM", "h100", 989.5 * TERA, 494.5 * TERA, H100_SOURCE),
    DevicePeak("H200 NVL", "h200 nvl", 835.5 * TERA, 417.5 * TERA, H200_SOURCE),
    DevicePeak("H200 SXM", "h200", 989.5 * TERA, 494.5 * TERA, H200_SOURCE),
    DevicePeak("A100", "a100", 312.0 * TERA, 156.0 * TERA, "NVIDIA A100 Tensor Core GPU datasheet"),
    DevicePeak(
        "A10G",
        "a10g",
        70.0 * TERA,
        35.0 * TERA,
        "no NVIDIA datasheet exists for the AWS-only A10G; 80 SMs x 256 dense BF16 FMA/clock x 1.71 GHz"
        " boost, as in third-party A10 vs A10G spec tables (the A10 itself is 125 TFLOP/s BF16)",
    ),
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The table entry for a CUDA device name / JAX device_kind, or None when unlisted."""
    name = device_name.lower()
    return next((p for p in PEAKS if p.match in name), None)


def peak_flops(device_name: str, dtype: str) -> float | None:
    peak = device_peak(device_name)
    return None if peak is None else getattr(peak, dtype)


def mfu(
    model_flops_per_image: float | None, images_per_s_per_device: float | None, device_name: str, dtype: str
) -> float | None:
    """Model FLOPs utilization of one device; None when any input is unknown."""
    peak = peak_flops(device_name, dtype)
    if peak is None or not model_flops_per_image or not images_per_s_per_device:
        return None
    return model_flops_per_image * images_per_s_per_device / peak


LIBRARIES = (
    "cxrjax",
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "flax",
    "optax",
    "numpy",
    "torch",
    "torchvision",
    "keras",
    "grain",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a benchmark result depends on (no imports)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
