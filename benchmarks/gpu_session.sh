#!/bin/bash
# Everything the lent GPU machine checks, in one call (device/README: one short, prepared script):
#   1. the Triton kernel tests compiled for the GPU (MHC_TEST_DEVICE=cuda, tests/devices.py) and tests/kernels/test_gpu.py
#      (Inductor schedules the kernels; results against float64);
#   2. benchmarks/mhc_bench.py's kernel section (16384 tokens, n=4, C=4096, bf16; against a device copy and Liger);
#   3. benchmarks/kernel_blocks.py (block sizes of the pre-mix kernels);
#   4. mhc_bench's end-to-end section (a GPT-2-small-sized model, torch.compile, plain against mHC n=4);
#   5. benchmarks/generate_speed.py: greedy decoding with the key-value cache, converted (lowered) against the
#      original, hidden 2048, bf16 (issue 22; the CPU rows in BENCHMARKS.md are eager at the dispatch floor);
#   6. one summary, $OUT/results/gpu/<date>-<device>.json (mhc_bench.py --merge): the fields and each target
#      with its limit scaled by the copy bandwidth of the same run; copy it into results/gpu/ and commit it.
# Results go to $OUT (the device tool brings them back). Carry .whl (a liger-kernel wheel) for the Liger rows.
# Stage limits (seconds; env TESTS_S, KERNELS_S, BLOCKS_S, E2E_S, DECODE_S) sum to 540: give the call timeout_s 560.
# Seen on a cold H200 (2026-11-26): the tests took 39 s on one machine and over 55 s on another (Triton compiles per variant).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MHC_TEST_DEVICE=cuda PYTHONPATH=$PWD
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1  # the "mhc" entry point
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  date -u; } 2>&1 | tee "$OUT/env.txt"
# each stage has its own limit (seconds, env); a limit of 0 skips the stage
run() { local limit=$1; shift; [ "$limit" -gt 0 ] && timeout "$limit" "$@"; }
run "${TESTS_S:-135}" python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_triton_kernels.py \
    tests/kernels/test_kernels_large_values.py tests/kernels/test_gpu.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -n 15 "$OUT/tests.log"
run "${KERNELS_S:-180}" python3 benchmarks/mhc_bench.py --skip-e2e --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
run "${BLOCKS_S:-60}" python3 benchmarks/kernel_blocks.py 2>&1 | tee "$OUT/blocks.log"
run "${E2E_S:-120}" python3 benchmarks/mhc_bench.py --skip-kernels --layers 12 --embd 768 --seq 1024 --batch 8 \
    --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
run "${DECODE_S:-45}" python3 benchmarks/generate_speed.py --device cuda --dtype bfloat16 --lower --hidden 2048 \
    --tokens 128 512 --repeats 1 2>&1 | tee "$OUT/decode.log"
slug=$(python3 -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
mkdir -p "$OUT/results/gpu"
python3 benchmarks/mhc_bench.py --merge "$OUT/kernels.json" "$OUT/e2e.json" \
    --out "$OUT/results/gpu/$(date -u +%F)-$slug.json" > "$OUT/summary.log" 2>&1
echo "summary rc=$?: $OUT/results/gpu/$(date -u +%F)-$slug.json"
