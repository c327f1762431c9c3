"""Run by tests/test_rollout_paths.py under `deepspeed --num_gpus 2`: a fast generation path that raises during
validation on every rank (all fall back together) or on rank 1 only while rank 0 waits in one of its collectives
(rank 1 must stop the run after the verdict timeout instead of hanging).

    deepspeed --num_gpus 2 tests/distributed/validation_fault.py --fail-on one --out DIR
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig

from sdft_ds import engines
from sdft_ds.rollout import ValidatedRollout

parser = argparse.ArgumentParser()
parser.add_argument("--fail-on", choices=["all", "one"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=-1)
cli = parser.parse_args()
rank, _ = engines.init_distributed()


class Appends(RolloutEngine):
    name = "reference"

    def generate(self, request, sampling, greedy=False):
        ids = torch.cat([request.prompt_ids, torch.full((request.prompt_ids.shape[0], 2), 7)], 1)
        return RolloutBatch(ids, torch.ones_like(ids), torch.full((ids.shape[0],), request.prompt_ids.shape[1]))

    def sync_weights(self, step):
        pass


class Breaks(Appends):
    name = "fast"

    def generate(self, request, sampling, greedy=False):
        if cli.fail_on == "all" or rank == 1:
            raise RuntimeError(f"kernel failed on rank {rank}")
        dist.broadcast(torch.ones(3), src=1)  # rank 0 inside a collective that rank 1 never joins
        return super().generate(request, sampling, greedy)


rollout = ValidatedRollout(Breaks(), Appends(), timeout_s=10)
request = RolloutRequest(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
rollout.generate(request, SamplingConfig(max_new_tokens=4))
(Path(cli.out) / f"report-rank{rank}.json").write_text(json.dumps({"path": rollout.name}))
