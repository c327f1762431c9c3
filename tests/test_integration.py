"""End-to-end SDFT under `deepspeed --num_gpus 2` on CPU: real ZeRO-3 engines, CPU-Adam offload, a real
teacher engine, sampling, a checkpoint on disk, and an offline Weights & Biases run."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import launch, read_reports
from sdft_ds.tracking import read_wandb_history as wandb_history

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def frozen_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen")
    launch(["tests/distributed/train_checks.py", "--out", str(out), "--overrides", '{"report_to": "wandb"}'],
           env={"WANDB_MODE": "offline", "WANDB_DIR": str(out)})
    return out


@pytest.fixture(scope="module")
def frozen_run(frozen_dir):
    return read_reports(frozen_dir)


def test_parameters_are_partitioned_across_ranks(frozen_run):
    for report in frozen_run:
        assert report["world_size"] == 2
        # ZeRO-3 pads each parameter to a multiple of the world size: about half each, never the whole model.
        assert 0.45 * report["total_params"] <= report["local_params"] <= 0.55 * report["total_params"]


def test_student_learns_and_teacher_stays_frozen(frozen_run):
    rank0 = frozen_run[0]
    assert rank0["student_max_change"] > 1e-3
    assert rank0["teacher_max_change"] == 0.0
    assert all(r["loss_finite"] for r in frozen_run)


def test_heldout_forward_kl_goes_down(frozen_run):
    rank0 = frozen_run[0]
    assert rank0["kl_after"] < 0.9 * rank0["kl_before"], rank0
    # Both ranks evaluate the same held-out batch with the same (gathered) weights.
    assert frozen_run[1]["kl_before"] == pytest.approx(rank0["kl_before"], rel=1e-6)


def test_saved_model_loads_equal_and_generates(frozen_dir, tokenizer):
    trained = torch.load(frozen_dir / "student_after.pt")
    model = AutoModelForCausalLM.from_pretrained(frozen_dir / "model", dtype=torch.float32)
    state = model.state_dict()
    assert set(trained) <= set(state)
    for name, value in trained.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the word 'cherry'."}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_metrics_reach_weights_and_biases_from_rank_zero_only(frozen_dir, frozen_run):
    runs = list((frozen_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # one run for the job, not one per rank
    history = wandb_history(runs[0])
    assert [row["_step"] for row in history] == [10, 20, 30]
    last = frozen_run[0]["metrics"]
    for name in ("loss", "divergence", "entropy", "completion_length", "learning_rate", "teacher_syncs"):
        assert history[-1][f"train/{name}"] == pytest.approx(last[name], rel=1e-12), name


def test_every_phase_is_on_the_clock(frozen_dir, frozen_run):
    """Per-step seconds of each phase reach the console metrics and W&B; together they make up the step."""
    from sdft_ds.tracking import PHASES

    metrics = frozen_run[0]["metrics"]
    phases = {name: metrics[f"time/{name}"] for name in PHASES}
    for name in ("generation", "teacher_forward", "student_forward", "backward", "optimizer_step"):
        assert phases[name] > 0, name
    assert phases["checkpoint"] == 0  # this run saves no checkpoint
    assert sum(phases.values()) <= metrics["step_time"] * 1.001
    assert sum(phases.values()) >= 0.8 * metrics["step_time"]  # nothing big happens outside the named phases
    # tokens/s counts prompt and completion tokens of both ranks: more than the completions alone
    assert metrics["tokens_per_second"] * metrics["step_time"] > 2 * 4 * metrics["completion_length"]
    history = wandb_history(next((frozen_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    assert history[-1]["time/generation"] == pytest.approx(phases["generation"], rel=1e-12)
