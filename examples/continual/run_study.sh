#!/usr/bin/env bash
# The whole study on CPU: data, pretraining, SFT and SDFT from the same checkpoint over seeds, report.
#   bash examples/continual/run_study.sh [OUT (default outputs/continual)] [SEEDS (default "0 1 2")]
# DATA_ARGS, PRETRAIN_ARGS and FINETUNE_ARGS add arguments to make_data.py, pretrain.py and finetune.py (the CI smoke
# test makes everything tiny with them).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source launch/setup_env.sh dev  # the package, and matplotlib for the plot
out="${1:-outputs/continual}"
seeds="${2:-0 1 2}"
here=examples/continual
python "$here/make_data.py" --out "$out/data" ${DATA_ARGS:-}
python "$here/pretrain.py" --out "$out/base" ${PRETRAIN_ARGS:-}
python -m sdft_ds.evaluate --model "$out/base" --stage pretrained --eval-sets "$out/data/teacher_check.json" \
  --results "$out/teacher_check.jsonl"
for seed in $seeds; do
  # SFT; SDFT as in the paper (EMA teacher); SDFT with the pretrained model as a frozen teacher
  for run in "sft" "sdft --teacher-mode ema" "sdft --teacher-mode frozen"; do
    name="$(echo "$run" | sed 's/ --teacher-mode /-/')"
    python "$here/finetune.py" --base "$out/base" --data "$out/data" --method $run --seed "$seed" \
      --out "$out/runs/$name-$seed" ${FINETUNE_ARGS:-}
  done
done
python "$here/report.py" --runs "$out/runs" --out "$out/report" --teacher-check "$out/teacher_check.jsonl"
