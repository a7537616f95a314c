#!/usr/bin/env bash
# Issue 22's GPU session in one command: the compiled-kernel tests, the block-size sweep, the kernel
# bench (one JSON per measurement) and greedy decoding of the 1B shape and the embedded model,
# fp16 nn.Linear against packed 3-bit + 0.35 % kept. Every stage has its own time limit, so the
# whole run stays under 9 minutes (540 s of limits) and a failing stage does not stop the others; each writes under
# $OUT (default bench/results/gpu_session), with its log.
#
#     OUT=/tmp/out bash bench/gpu_kernels.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT/kernels"
export TRITON_INTERPRET=0 OUT TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}  # a rerun on the same machine skips compiles
PY=${PYTHON:-python}
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit}" >> "$OUT/stages.jsonl"
    echo "$name: rc $rc in $((SECONDS - t0)) s"
    tail -3 "$OUT/$name.log"
}
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1
stage tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py
stage bench_kernels 120 $PY bench/bench_kernels.py --gpu-bits 3 --batch 1 2 4 8 16 --out "$OUT/kernels"
stage decode_1b 80 $PY bench/bench_decode.py --shape llama-3.2-1b --out "$OUT/kernels"
stage decode_embedded 40 $PY bench/bench_decode.py --model embedded --out "$OUT/kernels"
stage tune 100 $PY bench/tune_kernels.py --batch 1 --out "$OUT/kernels"
