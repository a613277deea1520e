#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (never CI): the runtime, engine and collective
# tests with every tensor on the GPU, whether NCCL can form the mesh's group there, and the engine
# against transformers on the GPU. Uses the machine's own python3/torch; pure-Python packages it lacks
# (OpenTelemetry) come as wheels in .whl/. Logs go to $OUT (or ./gpu-out).
#
#     bash scripts/gpu_check.sh [tests|nccl|bench|profile|cli|serve ...]     # default: tests nccl bench
# (serve also needs router_service/gen carried, and grpcio/protobuf wheels matching the stubs in .whl/)
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
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'transformers', transformers.__version__, torch.cuda.get_device_name())"
steps=${*:-tests nccl bench}
for step in $steps; do
  t0=$(date +%s)
  case $step in
    tests)
      # The same assertions as CI, with the runtime on the GPU (references stay transformers on CPU).
      MESH_TEST_DEVICE=cuda timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_model_parity.py tests/test_engine.py tests/test_kernels.py tests/test_collective.py \
        2>&1 | tee "$OUT/tests_cuda.log" | tail -25 ;;
    nccl)
      # One GPU: NCCL refuses two ranks on the same device ("Duplicate GPU detected"); record its answer.
      MESH_TEST_DEVICE=cuda MESH_TEST_BACKEND=nccl NCCL_DEBUG=WARN timeout 90 $PY -m pytest -q -p no:cacheprovider \
        -o addopts= "tests/test_collective.py::test_one_gateway_two_expert_ranks" 2>&1 | tee "$OUT/nccl.log" \
        | grep -E "Duplicate|NCCL WARN|passed|failed|Error" | sort -u | head -8 ;;
    bench)
      timeout 300 $PY bench/engine_vs_hf.py --device cuda --quick 2>&1 | tee "$OUT/bench_cuda.log" | grep -v "^\[" ;;
    cli)
      # `mesh generate --device cuda` against --device cpu: the same greedy tokens; bad devices named
      $PY -m mesh.cli init-model --arch qwen3_moe --preset tiny --out /tmp/mesh-tiny --seed 0 >/dev/null 2>&1
      for dev in cpu cuda; do
        $PY -m mesh.cli generate --model /tmp/mesh-tiny --device $dev --dtype float32 --prompt "def add(a, b):" \
          --max-tokens 24 --ignore-eos --json > "$OUT/cli_$dev.json" 2>"$OUT/cli_$dev.err"
        echo "$dev rc=$?"
      done
      $PY -c "import json,sys; a,b=(json.load(open(f'$OUT/cli_{d}.json')) for d in ('cpu','cuda')); \
print('cli cpu == cuda:', a['token_ids'] == b['token_ids'], len(a['token_ids']), 'tokens')"
      $PY -m mesh.cli generate --model /tmp/mesh-tiny --device cuda:7 --prompt-ids 1,2 2>&1 | tail -1 ;;
    serve)
      # `mesh serve --device cuda` over real gRPC: health, a remote generate equal to the in-process CPU
      # one, SIGTERM exit code and time
      DEV=${DEV:-cuda}
      [ -d /tmp/mesh-tiny ] || $PY -m mesh.cli init-model --arch qwen3_moe --preset tiny --out /tmp/mesh-tiny >/dev/null 2>&1
      $PY -m mesh.cli generate --model /tmp/mesh-tiny --device cpu --dtype float32 --prompt "def add(a, b):" \
        --max-tokens 24 --ignore-eos --json > "$OUT/serve_ref.json" 2>/dev/null
      $PY -m mesh.cli serve --model /tmp/mesh-tiny --device $DEV --dtype float32 --port 50111 --workers 0 \
        > "$OUT/serve.log" 2>&1 &
      spid=$!
      $PY -c "
import time, sys
from router_service.client import MeshClient, MeshError
c = MeshClient('127.0.0.1:50111', timeout=10)
for _ in range(120):
    try:
        if c.health(timeout=1) == 'SERVING': sys.exit(0)
    except MeshError: pass
    time.sleep(0.5)
sys.exit('not SERVING after 60 s')" && echo "health SERVING"
      $PY -m mesh.cli generate --target 127.0.0.1:50111 --prompt "def add(a, b):" --max-tokens 24 --ignore-eos \
        --temperature 0 --json > "$OUT/serve_gen.json" 2>"$OUT/serve_gen.err"
      $PY -c "import json; a=json.load(open('$OUT/serve_ref.json')); b=json.load(open('$OUT/serve_gen.json')); \
print('serve $DEV == in-process cpu:', a['token_ids'] == b['token_ids'], len(b['token_ids']), 'tokens')"
      ts0=$(date +%s.%N); kill -TERM $spid; wait $spid; rc=$?
      echo "SIGTERM: exit code $rc after $(python3 -c "print(round($(date +%s.%N) - $ts0, 1))") s"
      grep "listening" "$OUT/serve.log" | tail -1 ;;
    profile)
      # where a decode step's time goes on the GPU, per dtype (op tables into $OUT)
      for dt in float32 bfloat16; do
        timeout 150 $PY bench/step_profile.py --device cuda --dtype $dt --profile --repeat 5 \
          > "$OUT/profile_$dt.log" 2>&1
        grep '^{' "$OUT/profile_$dt.log"
      done ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 )) s"
done
