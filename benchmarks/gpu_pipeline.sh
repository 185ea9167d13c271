#!/usr/bin/env bash
# The real pipeline on a GPU machine of the device tool (Ray + DeepSpeed there come from .whl/,
# built once by ../shared/tools/device-wheels.sh; carry [".whl"], and [".tcache"] when a
# previous call packed fla's Triton autotuning there). posttrain is pip-installed into /tmp/pt
# and every run starts from /tmp (the repo root would shadow the package inside Ray workers).
#   bash benchmarks/gpu_pipeline.sh PART...   (logs, summaries and run outputs in $OUT)
# Parts:
#   gputests  the GPU tests: placement + CUDA IPC / NCCL syncs, multi-rank learners (NCCL)
#             (GPUTESTS: which; GPUTESTS_TIMEOUT: all of them, SIGINT so pytest still reports what failed
#             and why: session 10 lost test_zero3's errors to a SIGTERM; GPUTEST_EACH_TIMEOUT: one test)
#   rl_learner benchmarks/rl_learner_gpu.py --profile (RL learner micro-batch: shared prefix vs full forward)
#   lora      benchmarks/lora_vs_full.py (peak memory and step time, LoRA vs full)
#   decode    benchmarks/gpu_decode.py (DECODE_ARGS: e.g. --contexts 4096 --batches 1 64): native eager,
#             native with cuda_graphs, transformers
#   vs_trl    benchmarks/vs_trl.py --device cuda (VS_TRL_ARGS: e.g. --stages cispo grpo --budget 150);
#             NAME=vs_trl another one beside it (files NAME.*, arguments from VS_TRL_ARGS_NAME)
#   RECIPE    `posttrain run RECIPE` (a shipped name: gpu, gpu_split, ...): summary + metrics
#             (RUN_FLAGS=--resume continues /tmp/runs/RECIPE: a run cut by one call, on the warm machine)
#   NAME=RECIPE  the same, named NAME (run dir, logs), with overrides from $RUN_ARGS_NAME: two
#             variants of one recipe side by side, e.g. `gpu@0 gpu_b=gpu@1`
#   PART@N    PART in the background on GPU N alone (parts on different GPUs run at the same time);
#             A,B@N runs A then B there
set -o pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/pt . || exit 1
export PYTHONPATH=/tmp/pt:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/tcache && ls .tcache/triton.tgz.* >/dev/null 2>&1 && cat .tcache/triton.tgz.* | tar xz -C /tmp \
  && echo "triton cache: $(ls /tmp/tcache | wc -l) entries carried"
# only fla's autotuning results and the compiled launchers travel back (the winners compile again
# in seconds; all autotuned variants are >100 MB)
pack_cache() { (cd /tmp && { find tcache -name '*.autotune.json'; find tcache -name '*.so' -printf '%h\n'; } \
  | tar czf "$OUT/triton.tgz.aa" -T -); }
trap pack_cache EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# tests run from a copy outside any dir named posttrain, against the installed package
rm -rf /tmp/gt && mkdir -p /tmp/gt && cp -r tests/conftest.py tests/posttrain /tmp/gt/ && mv /tmp/gt/posttrain /tmp/gt/tp && cp -r tests/models /tmp/gt/tm && cp -r tests/rollout /tmp/gt/tr
run_part() {
  local part=$1
  echo "== $part $(date +%T) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})"
  case $part in
    gputests)
      (cd /tmp/gt && timeout -s INT -k 30 ${GPUTESTS_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --timeout ${GPUTEST_EACH_TIMEOUT:-240} -rfE --import-mode=importlib --rootdir /tmp/gt \
        --durations=0 ${GPUTESTS:-tp/test_gpu_placement.py tp/test_learner.py} 2>&1 | tee "$OUT/gputests.log" | tail -30) ;;
    vs_trl|*=vs_trl)  # benchmarks/vs_trl.py on CUDA; runs and checkpoints stay in /tmp, the table comes back
      # NAME=vs_trl: another invocation (its own dir and files, arguments from VS_TRL_ARGS_NAME)
      local vname=${part%%=*} vargs_var=VS_TRL_ARGS_${part%%=*}
      local vargs=${!vargs_var:-${VS_TRL_ARGS:-}}
      (cd /tmp && timeout ${VS_TRL_TIMEOUT:-420} python3 "$REPO/benchmarks/vs_trl.py" --device cuda $vargs \
        --out /tmp/$vname 2>&1 | grep --line-buffered -v Warning | tee "$OUT/$vname.log" | tail -30)
      cp /tmp/$vname/vs_trl.json "$OUT/$vname.json" 2>/dev/null; cp /tmp/$vname/vs_trl.png "$OUT/$vname.png" 2>/dev/null
      # with --profile, each row's report and trace (run/stages/*/profile/, trl/*/profile.txt, rank0.trace.json.gz)
      (cd /tmp/$vname/work && find . -name log.txt -o -name metrics.jsonl -o -name 'rank*.txt' -o -name profile.txt \
        -o -name '*.trace.json.gz' | tar czf "$OUT/${vname}_logs.tgz" -T -) ;;
    rl_learner)  # benchmarks/rl_learner_gpu.py: shared-prefix vs full forward of one RL micro-batch + profile
      (cd /tmp && timeout ${RL_LEARNER_TIMEOUT:-240} python3 "$REPO/benchmarks/rl_learner_gpu.py" --profile 2>&1 \
        | grep --line-buffered -v Warning > "$OUT/rl_learner.log"; grep -A8 "^### RL" "$OUT/rl_learner.log") ;;
    decode)
      (cd /tmp && timeout ${DECODE_TIMEOUT:-300} python3 "$REPO/benchmarks/gpu_decode.py" ${DECODE_ARGS:-} 2>&1 \
        | grep --line-buffered -v Warning | tee "$OUT/decode.log" | tail -16) ;;
    lora)
      (cd /tmp && timeout 300 python3 "$REPO/benchmarks/lora_vs_full.py" ${LORA_ARGS:-} 2>&1 | grep --line-buffered -v Warning \
        | tee "$OUT/lora.log" | tail -20) ;;
    *)
      local name=${part%%=*} recipe=${part#*=} args_var=RUN_ARGS_${part%%=*}
      local args=${!args_var:-${RUN_ARGS:-}}
      (cd /tmp && timeout -k 30 ${RUN_TIMEOUT:-420} python3 -m posttrain.cli run "$recipe" ${RUN_FLAGS:---overwrite} run_dir=/tmp/runs/$name $args \
        > "$OUT/$name.log" 2>&1; echo "rc=$?"; grep -v "Warning\|warn(" "$OUT/$name.log" | tail -40)
      tar cz -C /tmp/runs --exclude='*.safetensors' --exclude='*.pt' --exclude='state*' --exclude='checkpoint*' "$name" \
        > "$OUT/$name.run.tgz" ;;
  esac
  echo "== $part done $(date +%T)"
}
# PART@N runs in the background on GPU N only (e.g. `gpu@0 gputests,vs_trl@1` on a 2-GPU machine); the
# others run one after another; the script waits for all
for part in "$@"; do
  if [[ $part == *@* ]]; then
    (IFS=, read -ra seq <<< "${part%@*}"; for p in "${seq[@]}"; do CUDA_VISIBLE_DEVICES=${part#*@} run_part "$p"; done) &
  else
    run_part "$part"
  fi
done
wait
