#!/usr/bin/env bash
# The short GPU benchmark: the cases cxrjax's performance targets are judged on, in one
# command of at most 8 minutes on a bare, air-gapped GPU machine. From the repository root:
#
#   benchmarks/gpu_quick.sh h200               # results in benchmarks/results/h200/quick.*
#   benchmarks/gpu_quick.sh --smoke /tmp/quick # tiny net at 32/64 px on the CPU: checks this script
#
# Needs python3 with jax (CUDA), flax, optax, orbax-checkpoint, numpy, pandas and opencv; torch
# and torchvision for the peers (a peer that cannot import is reported as skipped). What cxrjax
# needs beyond that (ml_collections, grain, tensorflow-datasets, ...) is installed with
# pip --no-index from WHEELHOUSE (default benchmarks/wheelhouse; build it where PyPI is
# reachable with benchmarks/wheelhouse.sh) into a temporary folder put on PYTHONPATH.
#
# Environment: TOTAL_S bounds the whole run in seconds (default 470): cases that would start
# after it are recorded as "skipped: time", and every finished case is already in quick.jsonl.
# QUICK_ARGS adds arguments of python -m cxrjax.bench.quick (e.g. "--batch 64,8" on a 24 GB
# card). PYTHON picks the interpreter (default python3).
set -euo pipefail
start=$SECONDS
cd "$(dirname "$0")/.."
smoke=()
if [ "${1:-}" = "--smoke" ]; then
    smoke=(--smoke)
    shift
fi
target=${1:?usage: benchmarks/gpu_quick.sh [--smoke] DEVICE_NAME_OR_OUTPUT_DIR}
case "$target" in
    */*) out=$target ;;
    *) out=benchmarks/results/$target ;;
esac
total=${TOTAL_S:-470}
wheelhouse=${WHEELHOUSE:-benchmarks/wheelhouse}
python=${PYTHON:-python3}
read -r -a extra <<<"${QUICK_ARGS:-}"

# What cxrjax imports beyond the model stack; when any is missing, every distribution of
# benchmarks/wheelhouse.txt that this interpreter lacks is installed from the wheelhouse.
missing=$("$python" - <<'PY'
import importlib.metadata, importlib.util, re
needed = ("ml_collections", "grain", "tensorflow_datasets", "google_crc32c")
if all(importlib.util.find_spec(m) is not None for m in needed):
    raise SystemExit(0)
names = [re.sub(r"#.*", "", line).strip() for line in open("benchmarks/wheelhouse.txt")]
def installed(name):
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
print(" ".join(n for n in names if n and not installed(n)))
PY
)
if [ -n "$missing" ]; then
    if [ ! -d "$wheelhouse" ]; then
        echo "gpu_quick: $missing not installed and no wheelhouse at $wheelhouse;" \
            "build it with benchmarks/wheelhouse.sh where PyPI is reachable" >&2
        exit 2
    fi
    # pip --target ignores what the interpreter already has, so dependencies are not
    # resolved here: exactly the missing ones are installed, and the imports are checked.
    site=$(mktemp -d)/site
    echo "gpu_quick: installing $missing from $wheelhouse into $site"
    read -r -a names <<<"$missing"
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheelhouse" --target "$site" "${names[@]}"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

"$python" - <<'PY'
import importlib.metadata, platform
import grain.python, ml_collections, google_crc32c  # what the wheelhouse brings: fail here, named
from tensorflow_datasets.proto import tf_example_generated_pb2
import jax
names = ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "grain", "numpy")
versions = []
for name in names:
    try:
        versions.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        versions.append(f"{name} missing")
print(f"gpu_quick: Python {platform.python_version()}; {', '.join(versions)}; devices {jax.devices()}")
PY

left=$((total - (SECONDS - start) - 20)) # 20 s for the report after the last case
exec "$python" -m cxrjax.bench.quick --out "$out" --deadline-s "$left" ${smoke[@]+"${smoke[@]}"} \
    ${extra[@]+"${extra[@]}"}
