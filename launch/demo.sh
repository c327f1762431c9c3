#!/usr/bin/env bash
# README command 1: install, then run the embedded SDFT demo on 2 CPU ranks under DeepSpeed ZeRO-3.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source launch/setup_env.sh ""  # no extras; the demo arguments are for train.py
port="${MASTER_PORT:-29561}"
cleanup() { rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_* 2>/dev/null || true; }
trap cleanup EXIT
launch/run.sh --num_gpus 2 --master_port "$port" launch/train.py --config launch/recipes/demo.yaml "$@"
