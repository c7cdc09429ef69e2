"""Shared test setup: eight simulated CPU devices, the real NIH sample when present, and the
launch tests' fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

# The launch tests' fixtures, here so that a session-scoped one (moto's server, which keeps
# its state in this process) is made once, not once per module that uses it.
from launch_helpers import aws, repo  # noqa: F401

# Before any test touches a backend: data-parallel code is exercised on 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

NIH_DIR = Path(os.environ.get("CXRJAX_NIH_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "nih"))


@pytest.fixture
def nih_dir() -> Path:
    """The real NIH sample (metadata, split lists, 64 PNGs); skips when absent."""
    if not (NIH_DIR / "README.md").exists():
        pytest.skip(f"real NIH sample not found at {NIH_DIR} (set CXRJAX_NIH_DIR)")
    return NIH_DIR
