#!/usr/bin/env bash
# The CPU runs behind benchmarks/results/cpu/tiny.* and densenet121.*; run from the repository root.
#
# Needs this checkout importable (pip install -e . or PYTHONPATH=.), and for the peers torch with a
# torchvision built for it (torchvision from PyPI does not import beside a +cpu torch build; a
# matching pair such as torch 2.14.1 + torchvision 0.29.1 does) and keras 3 (the harness sets
# KERAS_BACKEND=jax in the Keras worker). A peer that cannot import is reported as skipped.
#
#   NIH_DIR=../shared/nih benchmarks/run_cpu.sh
set -euo pipefail
out=benchmarks/results/cpu
nih=${NIH_DIR:-../shared/nih}
prepared=${PREPARED:-/tmp/cxrjax-bench-nih64}

# The grain-fed step reads real NIH PNGs: the sample's training images prepared at 64 px.
[ -d "$prepared/train" ] || python -m cxrjax.cli prepare --nih-dir "$nih" --out "$prepared" --image-size 64 \
    --split official --skip-bad

# Every harness feature at tiny size: both dtypes, every remat mode, all peers (Keras has no tiny
# DenseNet and is reported as skipped), a 0.05 GiB budget search, 1/2/4/8 simulated devices,
# and the step fed by grain.
python -m cxrjax.bench --out "$out" --arch tiny --sizes 64 --dtypes float32,bfloat16 --remat none,dense_layers,all \
    --batch 8 --steps 20 --peers torch,torch_compile,keras --memory-budget-gb 0.05 --scaling \
    --prepared "$prepared" --workers 1

# The real model at 224 px, float32, with all three peers.
python -m cxrjax.bench --out "$out" --arch densenet121 --sizes 224 --dtypes float32 --remat none \
    --batch 8 --steps 8 --peers torch,torch_compile,keras

# Saved activations per image for every remat mode (from shapes; the same on any backend).
python benchmarks/saved_activations.py --out "$out"
