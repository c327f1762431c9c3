"""Generation paths on CPU: gather-once and per-layer agree (greedy) across 2 ZeRO-3 ranks that stop at
different lengths, leave the engine in training mode with nothing gathered, and the choice is explained."""

import subprocess
import sys
import time

import pytest
import torch
from deepspeed.runtime.rollout import RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig
from transformers import AutoConfig

from conftest import REPO, free_port, launch, read_reports, remove_shm
from sdft_ds import engines
from sdft_ds.rollout import ValidatedRollout, hybrid_engine_blocker


@pytest.mark.multirank
def test_gather_once_and_per_layer_agree_and_release(tmp_path):
    launch(["tests/distributed/rollout_paths.py", "--out", str(tmp_path)])
    for report in read_reports(tmp_path):
        for name in ("tiny-qwen2-student", "tiny-llama"):
            assert report[f"{name}_paths_agree"], name
            assert report[f"{name}_generated"] > 0
            assert report[f"{name}_default_path"] == "gather_once"  # CPU: no hybrid engine
            assert report[f"{name}_released_after_generation"]
            assert report[f"{name}_training_mode_after"]
            assert report[f"{name}_trains_after_generation"]


def llama(**kwargs):
    return AutoConfig.for_model("llama", **{"num_attention_heads": 8, "num_key_value_heads": 8, **kwargs})


@pytest.mark.parametrize("config, enabled, cuda, reason", [
    (llama(), False, True, "no enabled `hybrid_engine`"),
    (llama(), True, False, "need CUDA"),
    (AutoConfig.for_model("qwen2"), True, True, "no hybrid-engine policy for 'qwen2'"),
    (llama(num_key_value_heads=2), True, True, "not GQA-aware"),
    (llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}), True, True, "scaled RoPE"),
    (llama(), True, True, None),
    (AutoConfig.for_model("opt"), True, True, None),
])
def test_hybrid_engine_is_only_chosen_where_deepspeed_has_a_policy(config, enabled, cuda, reason):
    blocker = hybrid_engine_blocker(config, enabled, cuda)
    assert blocker is None if reason is None else reason in blocker


class FixedRollout(RolloutEngine):
    """A rollout engine of our own interface that appends fixed tokens: the fast path under validation."""

    def __init__(self, name, token):
        self.name, self.token, self.calls = name, token, 0

    def generate(self, request, sampling, greedy=False):
        self.calls += 1
        ids = torch.cat([request.prompt_ids, torch.full((request.prompt_ids.shape[0], 2), self.token)], 1)
        return RolloutBatch(ids, torch.ones_like(ids), torch.full((ids.shape[0],), request.prompt_ids.shape[1]))

    def sync_weights(self, step):
        pass


@pytest.mark.parametrize("fast_token, expected", [(7, "fast"), (8, "reference")])
def test_fast_path_is_used_only_after_it_matches_the_reference(fast_token, expected, caplog):
    engines.init_distributed()  # a one-rank group: validation all-reduces the verdict
    fast, reference = FixedRollout("fast", fast_token), FixedRollout("reference", 7)
    rollout = ValidatedRollout(fast, reference)
    request = RolloutRequest(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    for _ in range(3):
        batch = rollout.generate(request, SamplingConfig(max_new_tokens=4))
    assert rollout.name == expected
    assert int(batch.input_ids[0, -1]) == (fast_token if expected == "fast" else 7)
    assert ("disagrees" in caplog.text) == (expected == "reference")


@pytest.mark.multirank
def test_a_fast_path_failing_on_every_rank_falls_back_together(tmp_path):
    launch(["tests/distributed/validation_fault.py", "--fail-on", "all", "--out", str(tmp_path)])
    assert [r["path"] for r in read_reports(tmp_path)] == ["reference", "reference"]


@pytest.mark.multirank
def test_a_fast_path_failing_on_one_rank_stops_the_run_instead_of_hanging(tmp_path):
    port = free_port()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(port), "tests/distributed/validation_fault.py", "--fail-on", "one", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    remove_shm(port)
    assert done.returncode != 0
    assert time.monotonic() - started < 200  # the 10 s verdict timeout, not the 30 min of a stuck collective
    assert "did not reach the verdict" in done.stdout + done.stderr
    assert not list(tmp_path.glob("report-rank*.json"))


@pytest.mark.multirank
def test_compiled_decoding_equals_eager(tmp_path):
    launch(["tests/distributed/compiled_generation.py", "--out", str(tmp_path)], ranks=1)
    (report,) = read_reports(tmp_path, ranks=1)
    assert report["path"] == "gather_once+compiled"
    for batch in report["batches"]:
        assert batch["equal"], batch
    assert len(set(report["batches"][0]["lengths"])) > 1  # rows stopped at EOS at different steps
    first, _, same_size = report["batches"]
    assert first["new_graphs"] > 0  # the first rollout compiles ...
    assert first["width"] != same_size["width"] and same_size["new_graphs"] == 0  # ... other prompts reuse it
    assert report["trained"] == report["trained"]  # sampling through it trains (a finite loss)
