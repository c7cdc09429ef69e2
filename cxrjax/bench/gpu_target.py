"""Compile for an NVIDIA GPU that is not here: the targets users train on, as XLA devices.

XLA decides a step's memory when it compiles (buffer assignment), so compiling for a
described GPU gives the memory plan of that GPU on any machine with the CUDA plugin
(`pip install "jax[cuda12-local]"`; no driver, no card). The descriptions are package data
(`gpu_targets.json`, every figure with its source) and become XLA's `GpuTargetConfig`
text, with the CUDA and cuDNN versions the plugin will actually run with. Compiled
executables give memory, never times: nothing runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
from importlib import resources

from cxrjax.errors import InputError

log = logging.getLogger(__name__)

MIB = 2**20
PLUGIN_HINT = 'compiling for a GPU target needs the CUDA plugin: pip install "jax[cuda12-local]" (no GPU needed)'


class TargetError(InputError):
    """A target that is unknown here, or cannot be compiled for (a ValueError too)."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    key: str
    name: str  # the device name XLA reports, as the real card's driver does
    instances: str
    compute_capability: str
    sm_count: int
    clock_ghz: float
    memory_bandwidth_gb_s: float
    l2_cache_mib: float
    memory_mib: int
    sources: dict
    sm_limits: dict  # per-SM limits of the compute capability
    sm_limits_source: str

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


@functools.cache
def targets() -> dict[str, GpuTarget]:
    data = json.loads(resources.files("cxrjax.bench").joinpath("gpu_targets.json").read_text())
    limits = data["sm_limits"]
    return {
        key: GpuTarget(
            key=key,
            sm_limits=limits[t["compute_capability"]],
            sm_limits_source=limits["source"],
            **t,
        )
        for key, t in data["targets"].items()
    }


def get_target(key: str) -> GpuTarget:
    found = targets().get(key.lower())
    if found is None:
        raise TargetError(f"unknown GPU target {key!r}; choose from {', '.join(targets())}")
    return found


def target_for_device(device_kind: str) -> GpuTarget | None:
    """The target whose name is this real device's, or None (an unlisted GPU)."""
    kind = device_kind.lower()
    return next((t for t in targets().values() if t.name.lower() == kind), None)


def _version_tuple(code: int, cudnn: bool) -> tuple[int, int, int]:
    # CUDA encodes 12.9 as 12090; cuDNN 9.8.0 as 90800.
    if cudnn:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 10, 0


def cuda_versions() -> dict:
    """The CUDA runtime and cuDNN versions XLA would run with here: the installed libraries
    where the plugin can load them, otherwise those the plugin was built against (which is
    what `pip install "jax[cuda12]"` brings alongside it)."""
    try:
        plugin = importlib.metadata.version("jax-cuda12-plugin")
        from jax_cuda12_plugin import _versions
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise TargetError(PLUGIN_HINT) from None
    found = {"plugin": f"jax-cuda12-plugin {plugin}"}
    for key, get, build, is_dnn in (
        ("cuda", "cuda_runtime_get_version", "cuda_runtime_build_version", False),
        ("cudnn", "cudnn_get_version", "cudnn_build_version", True),
    ):
        try:
            code, source = getattr(_versions, get)(), "installed library"
        except Exception:  # no library to load: what the plugin was built against
            code, source = getattr(_versions, build)(), f"{found['plugin']} build"
        found[key] = ".".join(map(str, _version_tuple(int(code), is_dnn)))
        found[f"{key}_source"] = source
    return found


def target_config(target: GpuTarget, versions: dict) -> str:
    """XLA's GpuTargetConfig (text proto) for `target` with these CUDA/cuDNN versions."""
    major, minor = target.compute_capability.split(".")
    lim = target.sm_limits
    cuda = [int(v) for v in versions["cuda"].split(".")]
    dnn = [int(v) for v in versions["cudnn"].split(".")]
    return f"""
gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {lim["shared_memory_per_block_optin"]}
  shared_memory_per_core: {lim["shared_memory_per_core"]}
  threads_per_core_limit: {lim["threads_per_core_limit"]}
  core_count: {target.sm_count}
  fpus_per_core: {lim["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(target.memory_bandwidth_gb_s * 1e9)}
  l2_cache_size: {int(target.l2_cache_mib * MIB)}
  clock_rate_ghz: {target.clock_ghz}
  device_memory_size: {target.memory_bytes}
  registers_per_core_limit: {lim["registers_per_core_limit"]}
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}
runtime_version {{ major: {cuda[0]} minor: {cuda[1]} patch: {cuda[2]} }}
device_description_str: "{target.name}"
"""


def ensure_plugin_registered() -> None:
    """Let the CUDA plugin register where there is no NVIDIA driver. Its start-up check
    loads the CUDA libraries, fails without them and leaves a traceback on stderr; with the
    check skipped it registers (compiling for a target works), JAX finds no CUDA device and
    runs on the CPU, silently. Where a driver exists nothing changes. Call it before JAX
    initializes its backends (the CLI and the benchmark workers do, first thing)."""
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def compile_only_devices(target: GpuTarget, count: int = 1) -> tuple[list, dict]:
    """`count` compile-only devices of `target` on one host (a g5.24xlarge is 4 A10Gs), and
    the CUDA/cuDNN versions they were described with."""
    if count < 1:
        raise TargetError(f"a target needs at least one device, got {count}")
    versions = cuda_versions()
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            topology_name=target.key,
            platform="cuda",
            target_config=target_config(target, versions),
            topology=f"1x1x{count}",
        )
    except Exception as e:  # the plugin did not register (its start-up check failed, a broken install)
        raise TargetError(f"cannot compile for {target.key}: {str(e).splitlines()[0]}; {PLUGIN_HINT}") from e
    devices = list(topology.devices)
    log.info(
        "compiling for %d x %s (compile-only: CUDA %s, cuDNN %s)",
        count,
        target.name,
        versions["cuda"],
        versions["cudnn"],
    )
    return devices, versions
