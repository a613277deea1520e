#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (never CI): the CUDA backend's tests with every
# tensor on the GPU, then bench/gpu_serving.py at the real Qwen3-Coder-30B-A3B shape. Uses the
# machine's own python3/torch/triton/transformers; pure-Python packages it lacks (OpenTelemetry) come
# as wheels in .whl/. Logs go to $OUT (or ./gpu-out).
#
#     bash scripts/gpu_check.sh [smoke|bench|bench-next|tests ...]     # default: smoke bench tests
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
steps=${*:-smoke bench tests}
for step in $steps; do
  t0=$(date +%s)
  case $step in
    smoke)
      # a tiny model: greedy tokens of the cuda backend (graphs) against the CPU's
      $PY -m mesh_cli init-model --arch qwen3_moe --preset tiny --out /tmp/mesh-tiny --seed 0 >/dev/null 2>&1
      for dev in cpu cuda; do
        timeout 120 $PY -m mesh_cli generate --model /tmp/mesh-tiny --device $dev --dtype float32 \
          --prompt "def add(a, b):" --max-tokens 24 --ignore-eos --max-num-seqs 16 --json \
          > "$OUT/smoke_$dev.json" 2>"$OUT/smoke_$dev.err"; echo "$dev rc=$?"
      done
      tail -3 "$OUT/smoke_cuda.err"
      $PY -c "import json; a,b=(json.load(open(f'$OUT/smoke_{d}.json')) for d in ('cpu','cuda')); \
print('smoke cpu == cuda:', a['token_ids'] == b['token_ids'], len(a['token_ids']), 'tokens')" ;;
    bench)
      timeout ${BENCH_TIMEOUT:-330} $PY bench/gpu_serving.py ${BENCH_ARGS:-} 2>"$OUT/bench.err" | tee "$OUT/bench.jsonl"
      tail -5 "$OUT/bench.err" ;;
    bench-next)
      # the hybrid Qwen3-Coder-Next at 24 of its 48 layers (bf16 fits one H200), batch 1 and 64
      timeout ${BENCH_TIMEOUT:-330} $PY bench/gpu_serving.py --preset coder-next --layers 24 --batches 1,64 \
        --mixed 64 ${BENCH_ARGS:-} 2>"$OUT/bench_next.err" | tee "$OUT/bench_next.jsonl"
      tail -5 "$OUT/bench_next.err" ;;
    tests)
      MESH_TEST_DEVICE=cuda timeout ${TESTS_TIMEOUT:-200} $PY -m pytest -q -x -p no:cacheprovider -o addopts= \
        tests/engine/test_cuda_engine.py tests/model/test_model_parity.py tests/model/test_paged_attention.py \
        tests/model/test_fused_moe.py 2>&1 | tee "$OUT/tests_cuda.log" | tail -15 ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 )) s"
done
