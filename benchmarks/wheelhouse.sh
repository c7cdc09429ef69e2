#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_quick.sh installs on an air-gapped GPU machine:
# benchmarks/wheelhouse.txt, for CPython 3.12 on manylinux x86_64 (the usual GPU image),
# without their dependencies (the image has the large ones: numpy, protobuf, pyarrow, ...).
#
#   benchmarks/wheelhouse.sh                 # into benchmarks/wheelhouse/ (git-ignored)
#   PY_VERSION=3.11 benchmarks/wheelhouse.sh /tmp/wheels
#
# Run it where PyPI is reachable, then carry the folder with the checkout. It stays under
# 40 MB (it fails above that, so a new dependency that drags in a large wheel is noticed).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/wheelhouse}
py=${PY_VERSION:-3.12}
limit_mb=40

platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$p")
done
mkdir -p "$dir"
while read -r name; do
    [ -n "$name" ] || continue
    if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        "${platforms[@]}" --dest "$dir" "$name" 2>/dev/null; then
        # Published as source only (promise): build it here, and keep it only if it is pure Python.
        built=$(mktemp -d)
        python3 -m pip wheel --quiet --no-deps --no-binary=:all: --wheel-dir "$built" "$name"
        for wheel in "$built"/*.whl; do
            case "$wheel" in
                *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$wheel" "$dir/" ;;
                *) echo "wheelhouse: $name has no wheel for Python $py and is not pure Python ($wheel)" >&2; exit 1 ;;
            esac
        done
        rm -rf "$built"
    fi
done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/wheelhouse.txt)

size_mb=$(du -sm "$dir" | cut -f1)
echo "wheelhouse: $(find "$dir" -name '*.whl' | wc -l) wheels, ${size_mb} MB in $dir (Python $py)"
if [ "$size_mb" -gt "$limit_mb" ]; then
    echo "wheelhouse: over ${limit_mb} MB; see which wheel grew: ls -lS $dir" >&2
    exit 1
fi
