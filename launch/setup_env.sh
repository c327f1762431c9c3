#!/usr/bin/env bash
# Create .venv (once) and install sdft_ds into it. Sourced by launch/demo.sh and tests/run.sh.
# CPU hosts pin torch with constraints-cpu.txt, or pip pulls a multi-GB CUDA build through deepspeed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
if [ ! -x "$repo/.venv/bin/python" ]; then
  python3 -m venv "$repo/.venv"
fi
stamp="$repo/.venv/.sdft_installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  "$repo/.venv/bin/pip" install -q --disable-pip-version-check -c "$repo/constraints-cpu.txt" \
    -e "$repo${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$repo/.venv/bin:$PATH"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed JIT-builds cpu_adam/shm_comm once per cache dir; a shared ~/.cache one can hold another version's build.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-offline}"
