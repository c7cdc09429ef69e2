#!/usr/bin/env bash
# The long, complete GPU benchmark set (H100, H200, A100, A10G). benchmarks/gpu_quick.sh is the
# short one (the targets' cases in a few minutes); both run the same cases through the same
# worker (cxrjax/bench). Run from the repository root on the GPU machine:
#
#   benchmarks/run_gpu.sh h100 [PREPARED_DIR]
#
# Writes benchmarks/results/<device>/densenet121.{json,md} and plots. Needs jax with CUDA, flax,
# optax, ml_collections, numpy, matplotlib and this checkout (pip install -e . or PYTHONPATH=.);
# `python -m cxrjax.bench` needs no grain, wandb or tensorflow-datasets. Peers: torch and
# torchvision with CUDA, keras >= 3 (run on JAX). A missing peer is reported as skipped.
# PREPARED_DIR (a `cxrjax prepare` output at 1024 px; needs grain) adds the training step fed by
# the real pipeline, and the input pipeline alone (benchmarks/input_pipeline.py) beside it.
#
# Expect about an hour: every case compiles (cxrjax, torch.compile and Keras), and the 24 GiB
# budget search (an A10G) compiles the step four or five times per case without running it.
set -euo pipefail
device=${1:?name the results folder: h100, h200, a100 or a10g}
prepared=${2:-}
out=benchmarks/results/$device
# Batch per device at 224, 320, 512 and 1024 px: the same for every framework; fits 24 GB
# at float32 without remat. Override with BATCHES=128,64,32,8 on an 80 GB card.
batches=${BATCHES:-64,32,16,4}

nvidia-smi -L
KERAS_BACKEND=jax python - <<'PY'
import importlib
missing = []
for name in ("jax", "flax", "optax", "ml_collections", "matplotlib", "torch", "torchvision", "keras"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
import jax
print("jax", jax.__version__, jax.devices())
print("missing (their cases are skipped or fail):", "; ".join(missing) or "nothing")
PY

fed=()
if [ -n "$prepared" ]; then
    fed=(--prepared "$prepared" --workers "${WORKERS:-8}")
fi
python -m cxrjax.bench --out "$out" --arch densenet121 --sizes 224,320,512,1024 --batch "$batches" \
    --dtypes float32,bfloat16 --remat none,dense_layers,all --steps 30 --peers torch,torch_compile,keras \
    --memory-budget-gb 24 --scaling ${fed[@]+"${fed[@]}"}

if [ -n "$prepared" ]; then
    python benchmarks/input_pipeline.py --out "$out"
fi
