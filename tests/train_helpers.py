"""Shared by the trainer tests: one small prepared dataset per session and the
`cxrjax train` command run as a real subprocess.

The fixtures build into the session's base temp directory and reuse what is there,
so modules that import them share one dataset and one compilation cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cxrjax.workdir import BEST_WEIGHTS, CHECKPOINTS, METRICS_LOG

ROOT = Path(__file__).resolve().parents[1]
SMOKE = f"{ROOT / 'configs' / 'chexnet.py'}:smoke"
STEPS_PER_EPOCH = 4  # the smoke variant's max_steps_per_epoch


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """60 synthetic patients (about 190 images) prepared at 32 px: train 139, val 17, test 36."""
    from cxrjax.data.prepare import PrepareOptions, prepare
    from cxrjax.data.synth import write_synthetic_nih

    base = tmp_path_factory.getbasetemp() / "train_data"
    out = base / "prepared"
    if not (out / "manifest.json").exists():
        write_synthetic_nih(base / "synth", num_patients=60, image_size=64, seed=0)
        prepare(base / "synth", out, PrepareOptions(image_size=32, source_size=64, workers=1))
    return out


@pytest.fixture(scope="session")
def train_env(tmp_path_factory) -> dict:
    """Environment of `cxrjax train` subprocesses: one CPU device unless a test says
    otherwise, unbuffered output, wandb's files out of the home directory, conftest's
    fast-compile XLA flags, and a persistent XLA cache shared by every run of the session
    (the runs compile the same programs; later runs load them instead of compiling)."""
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist each worker has its own base; the cache beside them is shared by
    # all (jax takes an entry it cannot read, say one half-written, as a miss).
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "CXRJAX_", "WANDB_"))}
    env.update(
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=os.environ["XLA_FLAGS"],  # conftest's fast-compile flags
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        WANDB_DIR=str(base / "wandb"),
        WANDB_CONFIG_DIR=str(base / "wandb" / "config"),
        WANDB_CACHE_DIR=str(base / "wandb" / "cache"),
        WANDB_DATA_DIR=str(base / "wandb" / "data"),
        WANDB_SILENT="true",
    )
    return env


# Any HTTP(S) attempt through these fails at once (nothing listens on port 9).
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}


def train_command(workdir: Path, prepared: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cxrjax.cli",
        "train",
        "--config",
        SMOKE,
        "--workdir",
        str(workdir),
        f"--config.data.prepared={prepared}",
        *overrides,
    ]


def run_train(workdir: Path, prepared: Path, env: dict, *overrides: str, timeout: float = 300):
    """Run `cxrjax train` to the end; the CompletedProcess with stdout and stderr merged."""
    return subprocess.run(
        train_command(workdir, prepared, *overrides),
        env=env,
        cwd=ROOT,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finalized_steps(workdir: Path) -> list[int]:
    """Steps whose checkpoint orbax has committed (a save in flight is a temporary directory)."""
    root = workdir / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def wait_for(condition, timeout: float, what: str, proc=None, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_all(procs, timeout: float = 400) -> list[int]:
    """Each process's exit code; any still running at the timeout is killed."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def read_state(workdir: Path, step: int) -> dict:
    """The saved train state of one step as numpy arrays."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / CHECKPOINTS / str(step) / "state")
    return _to_numpy(state)


def _to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def flat(tree) -> dict[str, np.ndarray]:
    """{'params/backbone/...': array} for comparing two trees leaf by leaf."""
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def metrics_rows(workdir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / METRICS_LOG).read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def best_weights_logits(workdir: Path, prepared: Path, part: str) -> np.ndarray:
    """float64 logits of WORKDIR/best_weights on every record of a prepared part, in
    record order, computed outside the trainer (its own decode, normalization, apply)."""
    import jax
    import jax.numpy as jnp

    from cxrjax.data.normalize import stats_for, to_model_input
    from cxrjax.data.pipeline import DecodeAndAugment, ShardedRecords
    from cxrjax.models import build_model
    from cxrjax.models.weights import load_weights

    cfg, variables = load_weights(workdir / BEST_WEIGHTS)
    model = build_model(cfg)
    source = ShardedRecords(prepared / part)
    decode = DecodeAndAugment(32)
    images = np.stack([decode.random_map(source[i], np.random.default_rng(0))["image"] for i in range(len(source))])
    mean, std = stats_for("imagenet", cfg.in_channels)
    logits = jax.jit(lambda v, x: model.apply(v, to_model_input(x, mean, std), train=False))(
        variables, jnp.asarray(images)
    )
    return np.asarray(logits, np.float64)
