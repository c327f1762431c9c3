#!/usr/bin/env bash
# `deepspeed` with SIGUSR1 left to the training ranks: every documented launch goes through here.
#   launch/run.sh --num_gpus 8 launch/train.py --config launch/recipes/quickstart.yaml [--field value ...]
# SLURM's `--signal=USR1@T` and `kill -USR1 -- -PGID` signal every process of the job. DeepSpeed's runner and
# per-node launcher have no SIGUSR1 handler and would die at once, leaving the ranks unsupervised; ignored here,
# the ignore is inherited across fork and exec by both, and each rank replaces it with its own handler (it saves a
# checkpoint at the next optimizer step and exits 128 + 10). See launch/README.md, "Stopping a run".
# The launcher's own log at warning: its INFO lines (environment, world info) are per node and per start; a
# --log_level given by the caller comes later and wins.
trap '' USR1
exec deepspeed --log_level warning "$@"
