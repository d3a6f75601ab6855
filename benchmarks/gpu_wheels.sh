#!/usr/bin/env bash
# Build .gpu_wheels/: the peers' pure-Python wheels that the GPU image lacks (cut-cross-entropy, liger-kernel), for
# CPython 3.12 (the image's python3), to carry with a device call (carry: [".gpu_wheels"]); benchmarks/gpu_check.sh
# installs them there with pip --no-index --no-deps. Needs PyPI (run it here, not on the device); git-ignored.
#
#   benchmarks/gpu_wheels.sh [DEST]        (default DEST: .gpu_wheels at the repository root)
#
# The image already has torch 2.11, triton 3.6, transformers, pytest, pytest-benchmark, hypothesis, matplotlib,
# psutil. nvidia-cutlass-dsl (for Liger's CuTe FLCE) is not carried: its CUDA 13 libraries wheel alone is ~88 MiB,
# over the 64 MiB a call may carry.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.gpu_wheels}
PY=${PYTHON:-python3}
LIMIT_MIB=64
PACKAGES=("liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}")

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "${PACKAGES[@]}"
for wheel in "$DEST"/*.whl; do
    case $wheel in
        *-py3-none-any.whl) ;;
        *) echo "not a pure-Python wheel: $wheel" >&2; exit 1 ;;
    esac
done
size=$(du -sm "$DEST" | cut -f1)
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "$DEST is $size MiB, over the $LIMIT_MIB MiB a device call carries" >&2
    exit 1
fi
ls -l "$DEST"
echo "$DEST: $size MiB; carry it: run(command=..., carry=[\".gpu_wheels\"])"
