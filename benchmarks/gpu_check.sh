#!/usr/bin/env bash
# GPU check for a CUDA machine without network: the test suite on the GPU, the Triton design A/B sweep, then the
# llama3-8b and gemma2-9b benchmark presets, in about 12 minutes; everything is written under DIR (summary.txt
# lists each step's status).
#
#   benchmarks/gpu_check.sh DIR
#
# Nothing is downloaded. Environment:
#   SPPO_BENCH_WHEELS  folder of wheels to install first (pip --no-index --no-deps), e.g. liger-kernel,
#                      cut-cross-entropy, pytest-benchmark, matplotlib, psutil
#   PYTHON             interpreter (default: python)
#   TEST_TIMEOUT       seconds for pytest (default 180); PRESET_TIMEOUT seconds per preset (default 170)
#   TOKENS             token counts per preset (default 8192; comma-separated for a sweep)
#   LLAMA_PROVIDERS / GEMMA_PROVIDERS  comma-separated providers (defaults below; see loss_bench.py --list)
#   SWEEP_VARIANTS     Triton variants for benchmarks/triton_sweep.py (default below; "none" skips the sweep);
#                      SWEEP_TIMEOUT seconds (default 240)
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1

unset TRITON_INTERPRET       # tests/conftest.py sets it only when there is no CUDA device
export PIP_NO_INDEX=1        # never reach for the network
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

# step NAME SECONDS COMMAND...: run with a time limit, log to DIR/NAME.log, record rc and duration
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || FAILED=1
    echo "$name: rc=$rc ($(($(date +%s) - start)) s; limit $limit s)" | tee -a "$SUMMARY"
}

if [ -n "${SPPO_BENCH_WHEELS:-}" ]; then
    step install 120 "$PY" -m pip install --no-index --no-deps "$SPPO_BENCH_WHEELS"/*.whl
fi

{
    date -u
    nvidia-smi || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PY" -m pip list 2>/dev/null | grep -iE "torch|triton|liger|cut-cross|sppo|pytest|matplotlib|psutil"
} >"$OUT/environment.txt" 2>&1

step pytest "${TEST_TIMEOUT:-180}" "$PY" -m pytest tests -q -rfEs -p no:cacheprovider --junitxml="$OUT/pytest.xml"

# Triton A/B: old atomic vs new chunked backward, fused SPPO loss on/off, tile candidates chosen on the CPU by the
# faithful sm_90 compile (tests/sm90_compile.py --sweep); times, peak memory, bitwise determinism, compiled
# registers/spills per kernel. Results: DIR/sweep/triton_sweep.jsonl and sweep.log (Markdown table).
SWEEP_VARIANTS=${SWEEP_VARIANTS:-default,atomic-backward,fused-loss,tiles-128x128x64-s3-g4,tiles-128x128x64-s4,tiles-128x128x128-s2,tiles-64x256x64-s3,programs-per-sm-2,fused-exp-128x256x64-w16}
if [ "$SWEEP_VARIANTS" != none ]; then
    step sweep "${SWEEP_TIMEOUT:-240}" "$PY" benchmarks/triton_sweep.py --out "$OUT/sweep" \
        --tokens "$(echo "${TOKENS:-8192}" | cut -d, -f1)" --variants "$SWEEP_VARIANTS" --warmup 1 --repeats 3
fi

LLAMA_PROVIDERS=${LLAMA_PROVIDERS:-naive,torch-lce,liger-flce,liger-dpo,cce,cce-filtered,ours-triton,ours-triton-atomic,ours-triton-fused,ours-chunked}
GEMMA_PROVIDERS=${GEMMA_PROVIDERS:-naive,torch-lce,liger-flce,liger-dpo,cce,ours-triton,ours-triton-atomic,ours-triton-fused,ours-chunked}
for preset in llama3-8b gemma2-9b; do
    providers=$LLAMA_PROVIDERS
    [ "$preset" = gemma2-9b ] && providers=$GEMMA_PROVIDERS
    step "bench-$preset" "${PRESET_TIMEOUT:-170}" "$PY" benchmarks/loss_bench.py --preset "$preset" \
        --device cuda --dtype bfloat16 --tokens "${TOKENS:-8192}" --providers "$providers" \
        --warmup 2 --repeats 10 --timeout 75 --out "$OUT/$preset" --markdown "$OUT/RESULTS.md"
done

echo "results: $OUT (summary.txt, pytest.log, sweep.log, sweep/, bench-*.log, */loss_bench_*.json|png, RESULTS.md)"
cat "$SUMMARY"
exit "$FAILED"
