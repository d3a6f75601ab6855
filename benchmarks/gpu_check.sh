#!/usr/bin/env bash
# The GPU check, sized for one lent H100/H200 (15 minutes of device time, one command at most 10): two commands,
# each within its own time budget, each packing everything it wrote into one archive under OUT plus one short
# summary.txt (the device returns at most 8 files, and nothing of a killed step: so every step writes as it goes
# and the archive is re-packed after each step).
#
#   benchmarks/gpu_check.sh tests [OUT]   # CUDA tests (pytest -m gpu), the Triton design sweep (gemma2-9b)   ~5.5 min
#   benchmarks/gpu_check.sh bench [OUT]   # loss_bench at llama3-8b and gemma2-9b against every peer          ~6.5 min
#   benchmarks/gpu_check.sh --dry-run tests|bench [OUT]   # the same commands here on the CPU: micro preset,
#                                         # Triton interpreter, the image's missing packages hidden (seconds)
#
# OUT defaults to $OUT (the device tool's result folder). Nothing is downloaded: the peers' pure-Python wheels come
# from .gpu_wheels/ (benchmarks/gpu_wheels.sh builds it; carry it with the call) and are installed with
# pip --no-index --no-deps into a private folder. Environment: PYTHON (default python3), BUDGET_S (the command's
# wall-clock budget), TEST_S / SWEEP_S / PRESET_S (step limits), SWEEP_VARIANTS, LLAMA_PROVIDERS, GEMMA_PROVIDERS.
set -uo pipefail

DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
PART=${1:?usage: benchmarks/gpu_check.sh [--dry-run] tests|bench [OUT]}
OUT=${2:-${OUT:?give OUT (the folder the results are packed into)}}
case $PART in tests | bench) ;; *) echo "unknown part $PART (tests or bench)" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_$PART.XXXXXX")
ARCHIVE="$OUT/gpu-$PART.tar.gz"
SUMMARY="$OUT/summary.txt"
cd "$ROOT" || exit 1

if [ "$PART" = tests ]; then BUDGET=${BUDGET_S:-330}; else BUDGET=${BUDGET_S:-390}; fi
DEADLINE=$(($(date +%s) + BUDGET))
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MISSING=datasets,deepspeed,trl,llm_blender,cutlass  # absent on the GPU image (KINDS.md) and not carried
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE=(--device cpu) PRESETS=(micro micro) TOKENS=64 REPEATS=(--warmup 0 --repeats 1)
    SWEEP_REPEATS=("${REPEATS[@]}")
else
    unset TRITON_INTERPRET  # tests/conftest.py sets it only when there is no CUDA device
    DEVICE=(--device cuda) PRESETS=(llama3-8b gemma2-9b) TOKENS=8192 REPEATS=(--warmup 2 --repeats 5)
    SWEEP_REPEATS=(--warmup 1 --repeats 3)
fi
FAILED=0
: >"$WORK/steps.txt"

pack() {  # the archive of everything so far, and the short summary; both replaced whole
    tar -czf "$ARCHIVE.tmp" -C "$WORK" . && mv "$ARCHIVE.tmp" "$ARCHIVE"
    "$PY" benchmarks/gpu_summary.py "$WORK" >"$SUMMARY.tmp" 2>&1 || cat "$WORK/steps.txt" >"$SUMMARY.tmp"
    mv "$SUMMARY.tmp" "$SUMMARY"
}

# step NAME SECONDS COMMAND...: run under min(SECONDS, what the budget leaves), log to WORK/NAME.log, pack
step() {
    local name=$1 limit=$2 start rc left
    shift 2
    left=$((DEADLINE - $(date +%s) - 15))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "$name: skipped (budget of $BUDGET s spent)" >>"$WORK/steps.txt"
        FAILED=1
        pack
        return
    fi
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || FAILED=1
    echo "$name: rc=$rc ($(($(date +%s) - start)) s; limit $limit s)" >>"$WORK/steps.txt"
    pack
}

install_wheels() {  # the peers' wheels into WORK/site, first on PYTHONPATH; the packages they bring are not hidden
    local wheels=("${SPPO_GPU_WHEELS:-$ROOT/.gpu_wheels}"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no wheels in .gpu_wheels (benchmarks/gpu_wheels.sh builds them): liger and cce rows will say why"
        MISSING=$MISSING,liger_kernel,cut_cross_entropy
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$WORK/site" \
        "${wheels[@]}" || return 1
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    printf 'installed %s\n' "${wheels[@]##*/}"
}

{
    date -u
    echo "part $PART, dry run $DRY, budget $BUDGET s"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    git -C "$ROOT" log -1 --format='git %h %s' 2>/dev/null
} >"$WORK/environment.txt" 2>&1
install_wheels >"$WORK/wheels.log" 2>&1 || FAILED=1
if [ "$DRY" = 1 ]; then  # imitate the image: its missing packages fail to import here too
    export SPPO_HIDE_MODULES=$MISSING PYTHONPATH="$ROOT/benchmarks/gpu_image:$PYTHONPATH"
fi
echo "hidden or missing: $MISSING" >>"$WORK/environment.txt"
pack

if [ "$PART" = tests ]; then
    PYTEST=("$PY" -m pytest tests -m gpu -v -rfEs -p no:cacheprovider --durations=15 --junitxml="$WORK/pytest.xml")
    "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=90)
    [ "$DRY" = 1 ] && PYTEST+=(--collect-only)
    step pytest "${TEST_S:-140}" "${PYTEST[@]}"
    VARIANTS=${SWEEP_VARIANTS:-default,fused-loss,dh-rounded,chunk-256MiB,tiles-128x128x64-w8-s3,tiles-128x128x64-w8-s4,fused-tiles-128x128x64-w8-s3,atomic-backward}
    step sweep "${SWEEP_S:-160}" "$PY" benchmarks/triton_sweep.py --out "$WORK/sweep" --presets "${PRESETS[1]}" \
        --tokens "$TOKENS" --variants "$VARIANTS" "${DEVICE[@]}" "${SWEEP_REPEATS[@]}"
else
    PROVIDERS=("${LLAMA_PROVIDERS:-naive,torch-lce,liger-flce,liger-dpo,liger-cute-flce,cce,cce-filtered,ours-triton,ours-triton-fused,ours-chunked}"
        "${GEMMA_PROVIDERS:-naive,liger-flce,cce,cce-filtered,ours-triton,ours-triton-fused,ours-chunked}")
    for i in 0 1; do
        preset=${PRESETS[$i]}
        step "bench-$((i + 1))-$preset" "${PRESET_S:-185}" "$PY" benchmarks/loss_bench.py --preset "$preset" "${DEVICE[@]}" \
            --dtype bfloat16 --tokens "$TOKENS" --providers "${PROVIDERS[$i]}" "${REPEATS[@]}" --timeout 75 \
            --out "$WORK/bench-$((i + 1))" --markdown "$WORK/RESULTS-gpu.md" --no-plot
    done
fi

pack
cat "$SUMMARY"
echo "packed: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1)), $SUMMARY"
rm -rf "$WORK"
exit "$FAILED"
