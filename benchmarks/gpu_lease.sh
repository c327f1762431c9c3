#!/usr/bin/env bash
# Everything that needs a CUDA device, in one run sized for a short GPU lease:
#
#     bash benchmarks/gpu_lease.sh OUTDIR [SECONDS]        # default 540 s
#
# Stages run in order of value, each under the time left before the deadline, each writing OUTDIR/<stage>.log;
# OUTDIR/summary.md lists them with exit codes and seconds. DeepSpeed's ops are JIT-built first (CPU-Adam in the
# foreground, the hybrid engine's inference kernels in the background while the correctness checks run), so the
# timed stages run on an otherwise idle machine. Expects torch, deepspeed, transformers, datasets on the path
# (liger-kernel and trl for their baselines; flash-attn for its test).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_lease.sh OUTDIR [SECONDS]}
deadline=$((SECONDS + ${2:-540}))
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
export DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions TORCH_CUDA_ARCH_LIST=9.0 \
       WANDB_MODE=disabled SDFT_PROGRESS=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run under min(SECONDS, time left), log to OUTDIR/NAME.log
    local name=$1 want=$2 left=$((deadline - SECONDS)) t0=$SECONDS rc
    shift 2
    if ((left < 30)); then echo "| $name | not run: $left s left | |" >>"$out/summary.md"; return; fi
    timeout -k 5 $((want < left ? want : left)) "$@" >>"$out/$name.log" 2>&1
    rc=$?
    echo "| $name | exit $rc$( ((rc == 124)) && echo ' (timed out)') | $((SECONDS - t0)) s |" >>"$out/summary.md"
    tail -n 25 "$out/$name.log"
}

{
    echo "# $(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING
    echo; echo "| stage | result | time |"; echo "|---|---|---|"
} >"$out/summary.md"

build='from deepspeed.accelerator import get_accelerator as a; import sys; a().create_op_builder(sys.argv[1]).load()'
stage build 200 $python -c "$build" CPUAdamBuilder
MAX_JOBS=8 timeout $((deadline - SECONDS)) $python -c "$build" InferenceBuilder >"$out/build_inference.log" 2>&1 &
inference_build=$!

stage gpu_tests 200 $python -m pytest tests/test_gpu.py -m gpu -k "not hybrid" -v -p no:cacheprovider
stage divergence 120 $python benchmarks/divergence.py --device cuda
wait $inference_build
echo "| build_inference | exit $? | (background) |" >>"$out/summary.md"
stage gpu_tests_hybrid 120 $python -m pytest tests/test_gpu.py -m gpu -k hybrid -v -p no:cacheprovider
stage step 200 $python benchmarks/step.py --device cuda --size small,loss-bound --steps 3 \
    --sdft-configs zero3_offload.json,zero3.json
stage rollout 150 $python -m deepspeed.launcher.runner --num_gpus 1 benchmarks/rollout.py --model llama-1b
cat "$out/summary.md"
