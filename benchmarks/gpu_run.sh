#!/usr/bin/env bash
# All GPU measurements of docs/gpu.md, in-process (no Ray, no DeepSpeed), on a machine where
# `posttrain` is not installed: fla-core comes from .whl/ (pip download fla-core==0.6.0 --no-deps
# -d .whl) and the package layout is rebuilt with symlinks (posttrain.rollout -> rollout/ ...).
#   bash benchmarks/gpu_run.sh tests|lightning|decode|train|all     (logs and JSON in $OUT)
# Triton's compiled kernels and fla's autotuning results (FLA_CACHE_RESULTS, on by default) go to
# /tmp/tcache; the script ends by packing them into $OUT/triton.tgz, and a later call that
# carries .tcache/triton.tgz starts from them (a cold machine spends minutes autotuning fla).
set -o pipefail
part=${1:-all}
OUT=${OUT:-$PWD/benchmark_out}; mkdir -p "$OUT"; export OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/pp && mkdir -p /tmp/pp/posttrain
for f in "$PWD"/posttrain/*; do ln -s "$f" /tmp/pp/posttrain/; done
for d in rollout data algorithms recipes; do ln -s "$PWD/$d" /tmp/pp/posttrain/$d; done
export PYTHONPATH=/tmp/pp:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
mkdir -p /tmp/tcache && ls .tcache/triton.tgz.* >/dev/null 2>&1 && cat .tcache/triton.tgz.* | tar xz -C /tmp && echo "triton cache: $(ls /tmp/tcache | wc -l) entries carried"
pack_cache() {  # in parts of 14 MiB (files come back at most 16 MiB each)
  tar cz -C /tmp tcache | split -b 14m - "$OUT/triton.tgz."; echo "triton cache packed: $(du -sh /tmp/tcache | cut -f1) -> $(ls "$OUT"/triton.tgz.* | wc -l) parts"; }
trap pack_cache EXIT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)"
run() { local t=$1; shift; echo "== $*"; timeout "$t" "$@"; }
if [[ $part == tests || $part == all ]]; then
  run 90 python3 -m pytest -q -p no:cacheprovider tests/models/test_gpu_lightning.py 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ $part == lightning || $part == all ]]; then
  run 120 python3 benchmarks/gpu_lightning.py --budget 70 2>&1 | tee "$OUT/lightning.log" | tail -14
fi
if [[ $part == train || $part == all ]]; then
  run 200 python3 benchmarks/gpu_train.py --budget 150 --max-lengths 1048576 524288 2>&1 | tee "$OUT/train.log" | tail -14
fi
if [[ $part == second ]]; then  # the second device call: what the first could not finish
  run 170 python3 -m pytest -x -q -p no:cacheprovider tests/models/test_gpu_lightning.py 2>&1 | tee "$OUT/tests.log" | tail -25
  run 150 python3 benchmarks/gpu_lightning.py --budget 90 2>&1 | tee "$OUT/lightning.log" | tail -14
  run 150 python3 benchmarks/gpu_decode.py --budget 80 --contexts 4096 --profile 2>&1 | tee "$OUT/decode.log" | tail -60
fi
if [[ $part == third ]]; then  # decode after the cuDNN-plan fix in SoftmaxAttention.attend_one
  run 280 python3 benchmarks/gpu_decode.py --budget 170 --contexts 4096 --profile 2>&1 | tee "$OUT/decode.log" | grep -v "^  \|^---\|UserWarning\|_warn_once"
fi
if [[ $part == c1 ]]; then  # session 2, call 1: the lightning layer at 8K..512K, then the GPU tests
  run 400 python3 benchmarks/gpu_lightning.py --budget 320 2>&1 | tee "$OUT/lightning.log" | grep -v Warning
  run 150 python3 -m pytest -q -p no:cacheprovider --durations=0 tests/models/test_gpu_lightning.py 2>&1 | tee "$OUT/tests.log" | tail -30
fi
if [[ $part == c2 ]]; then  # call 2: training 8K..512K + profile + longest step, then the GPU tests call 1 did not reach
  run 450 python3 benchmarks/gpu_train.py --budget 370 --profile 8192 131072 --max-lengths 1048576 786432 2>&1 | tee "$OUT/train.log" | grep -v Warning
  run 75 python3 -m pytest -q -p no:cacheprovider --durations=0 tests/models/test_gpu_lightning.py \
    -k "varlen or decode_steps or model_prefill" 2>&1 | tee "$OUT/tests.log" | tail -20
  run 40 python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=30 tests/models/test_gpu_lightning.py \
    -k cpu_chunked 2>&1 | tee "$OUT/tests2.log" | grep -v "^ *$" | tail -40
fi
if [[ $part == c3 ]]; then  # call 3: every GPU test (the 6 never run first), then decode at 32K context
  t=tests/models/test_gpu_lightning.py
  run 330 python3 -m pytest -q -p no:cacheprovider --durations=0 -o faulthandler_timeout=240 $t::test_fla_matches_cpu_chunked_and_gradients \
    $t::test_fla_varlen_equals_per_document $t::test_decode_steps_continue_prefill_state \
    $t::test_model_prefill_and_decode_on_gpu_match_full_forward $t::test_fla_matches_float64_recurrence 2>&1 | tee "$OUT/tests.log" | tail -40
  run 230 python3 benchmarks/gpu_decode.py --budget 170 --contexts 32768 --batches 1 64 2>&1 | tee "$OUT/decode.log" | grep -v "^  \|^---\|UserWarning\|_warn_once"
fi
if [[ $part == c4 ]]; then  # call 4: the last two GPU tests, softmax-only training at 512K and 1M (one step each)
  run 90 python3 -m pytest -q -p no:cacheprovider --durations=0 tests/models/test_gpu_lightning.py \
    -k "decode_steps or model_prefill" 2>&1 | tee "$OUT/tests.log" | tail -12
  run 460 python3 benchmarks/gpu_train.py --models softmax-only --lengths 524288 1048576 --max-lengths --budget 500 \
    2>&1 | tee "$OUT/train.log" | grep -v Warning
fi
if [[ $part == decode || $part == all ]]; then
  run 160 python3 benchmarks/gpu_decode.py --budget 110 2>&1 | tee "$OUT/decode.log" | tail -14
fi
