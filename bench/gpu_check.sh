#!/usr/bin/env bash
# The GPU check, in one go (one lent GPU, about 10 minutes): parity on cuda against Transformers, then the benchmark
# against Transformers on a Llama-3-8B-shaped random model in bfloat16 (batch 1 and 32, prompt 128, 128 new tokens;
# a 4096-token prefill; the decode step under --compile, i.e. CUDA graphs), each figure beside its same-run baseline.
#   bench/gpu_check.sh [OUT_DIR]              # on a GPU machine with torch, transformers (nothing is installed)
#   bench/gpu_check.sh --dry-run [OUT_DIR]    # the same steps on the CPU with a tiny model (tests this script)
# Writes OUT_DIR/{gpu_parity.json, decode.json, compiled.json, prefill.json, log.txt}; exits non-zero if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=""
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
out=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec > >(tee "$out/log.txt") 2>&1

if [[ -n $dry ]]; then
  device=cpu dtype=float32 shape=tiny batches=1,4 prompt=32 new=8 prefill=256 compare=generate
else
  device=cuda dtype=bfloat16 shape=llama3-8b batches=1,32 prompt=128 new=128 prefill=4096 compare=generate,static
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, remember a failure, go on
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  if timeout "$limit" "$@"; then echo "== $name: ok in $((SECONDS - t0)) s"
  else echo "== $name: FAILED (exit $?) after $((SECONDS - t0)) s"; status=1; fi
}

step "parity on $device" 210 python bench/gpu_parity.py ${dry:+--dry-run} --out "$out"

model=${MODEL:-/tmp/distllama-random-$shape}
[[ -f $model/config.json ]] || step "random $shape checkpoint" 90 \
  python bench/random_checkpoint.py --shape "$shape" --dtype "$dtype" --device "$device" "$model"
bench=(python -m distllama.bench --model "$model" --device "$device" --dtype "$dtype" --threads "$OMP_NUM_THREADS")
step "decode, batch $batches, against Transformers" 180 "${bench[@]}" --batch-size "$batches" --prompt-len "$prompt" \
  --new-tokens "$new" --repeats 1 --compare-hf "$compare" --json "$out/decode.json"
step "decode, batch 1, --compile" 150 "${bench[@]}" --batch-size 1 --prompt-len "$prompt" --new-tokens "$new" \
  --repeats 1 --compile --json "$out/compiled.json"
step "prefill of $prefill tokens, against Transformers" 90 "${bench[@]}" --batch-size 1 --prompt-len "$prefill" \
  --new-tokens 2 --repeats 1 --compare-hf generate --json "$out/prefill.json"
echo "gpu_check: $([[ $status == 0 ]] && echo every step passed || echo some step FAILED); figures in $out"
exit $status
