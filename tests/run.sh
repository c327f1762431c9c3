#!/usr/bin/env bash
# README command 2: install (with the test extras), then run the test suite. GPU tests skip without CUDA.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source launch/setup_env.sh dev
python -m pytest tests "$@"
