"""Shared test setup: eight simulated CPU devices, fast compiles, the real NIH sample when
present, and the launch tests' fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from cxrjax.bench.gpu_target import ensure_plugin_registered

# Before JAX starts: the dev extra's CUDA plugin (for compiling to GPU targets) registers
# without a driver instead of failing its start-up check with a traceback.
ensure_plugin_registered()

import jax  # noqa: E402
import pytest  # noqa: E402

# The launch tests' fixtures, here so that a session-scoped one (moto's server, which keeps
# its state in this process) is made once, not once per module that uses it.
from launch_helpers import aws, repo  # noqa: F401, E402

# Before any test touches a backend: data-parallel code is exercised on 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

# Compile time dominates the suite. The tests check what programs compute, not how fast
# they run, so XLA's backend optimizations are off (a third of the compile time goes), in
# this process and in every subprocess it starts (train_helpers.train_env passes them on).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()

# And programs this process compiles again (each training run jits its own step) load from
# a persistent cache of its own, removed when the process ends.
_JAX_CACHE = tempfile.mkdtemp(prefix="cxrjax-tests-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE, True)
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

NIH_DIR = Path(os.environ.get("CXRJAX_NIH_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "nih"))


@pytest.fixture
def nih_dir() -> Path:
    """The real NIH sample (metadata, split lists, 64 PNGs); skips when absent."""
    if not (NIH_DIR / "README.md").exists():
        pytest.skip(f"real NIH sample not found at {NIH_DIR} (set CXRJAX_NIH_DIR)")
    return NIH_DIR


def pytest_collection_modifyitems(items):
    """Modules with a slow test first, each module kept whole: under --dist loadfile the two
    workers then finish together, instead of one waiting out a long module handed out last."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
