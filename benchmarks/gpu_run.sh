#!/usr/bin/env bash
# All GPU measurements of docs/gpu.md, in-process (no Ray, no DeepSpeed), on a machine where
# `posttrain` is not installed: fla-core comes from .whl/ (pip download fla-core==0.6.0 --no-deps
# -d .whl) and the package layout is rebuilt with symlinks (posttrain.rollout -> rollout/ ...).
#   bash benchmarks/gpu_run.sh tests|lightning|decode|train|all     (logs and JSON in $OUT)
set -o pipefail
part=${1:-all}
OUT=${OUT:-$PWD/benchmark_out}; mkdir -p "$OUT"; export OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/pp && mkdir -p /tmp/pp/posttrain
for f in "$PWD"/posttrain/*; do ln -s "$f" /tmp/pp/posttrain/; done
for d in rollout data algorithms recipes; do ln -s "$PWD/$d" /tmp/pp/posttrain/$d; done
export PYTHONPATH=/tmp/pp:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)"
run() { local t=$1; shift; echo "== $*"; timeout "$t" "$@"; }
if [[ $part == tests || $part == all ]]; then
  run 150 python3 -m pytest -q -p no:cacheprovider tests/models/test_gpu_lightning.py 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ $part == lightning || $part == all ]]; then
  run 170 python3 benchmarks/gpu_lightning.py --budget 100 2>&1 | tee "$OUT/lightning.log" | tail -14
fi
if [[ $part == decode || $part == all ]]; then
  run 230 python3 benchmarks/gpu_decode.py --budget 150 2>&1 | tee "$OUT/decode.log" | tail -14
fi
if [[ $part == train || $part == all ]]; then
  run 540 python3 benchmarks/gpu_train.py --budget 240 2>&1 | tee "$OUT/train.log" | tail -14
fi
