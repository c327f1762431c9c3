"""Interruption costs no work: a resumed run continues exactly where the checkpoint left it, and SIGTERM to the
processes of a job (what schedulers send before a kill) saves a checkpoint that the command line resumes from."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, launch, read_reports
from helpers import free_port, remove_shm

pytestmark = pytest.mark.multirank


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    launch(["tests/distributed/resume.py", "--out", str(tmp_path)])
    rank0, rank1 = read_reports(tmp_path)
    for report in (rank0, rank1):
        assert report["steps"] == 4 and report["latest"] == "step-4"
        assert report["saved_rollouts_left"] == 1 and report["saved_rollout_step"] == 0  # a stale rollout was saved
    assert rank0["student_moved"] > 1e-3 and rank0["teacher_moved"] > 1e-4
    # Not bitwise: DeepSpeedCPUAdam computes a fresh optimizer's bias correction β^t with pow() where a running
    # one multiplies by β each step, a last-ulp difference.
    assert rank0["student_difference"] < 1e-5 and rank0["teacher_difference"] < 1e-5, rank0


def _train_command(port: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
            "launch/train.py", "--config", "launch/recipes/demo.yaml", "--output_dir", str(out), "--max_steps", "12",
            "--logging_steps", "1", *extra]


def test_sigterm_saves_a_checkpoint_and_the_command_line_resumes(tmp_path):
    out, port = tmp_path / "run", free_port()
    env = child_env(PYTHONUNBUFFERED="1")
    command = _train_command(port, out, "--save_steps", "1", "--save_total_limit", "2")
    process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "step 2:" in line:
                os.killpg(process.pid, signal.SIGTERM)  # as SLURM and `kill -- -PGID` do: every process of the job
                break
        lines.extend(process.stdout)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        remove_shm(port)
    log = "".join(lines)
    assert process.returncode != 0, log[-4000:]
    assert "stopped by signal 15" in log, log[-4000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step-"))
    assert 2 <= stopped_at < 12
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == sorted([f"step-{stopped_at - 1}", tag])
    assert not (out / "model.safetensors").exists()  # an unfinished run exports nothing

    one_rank = subprocess.run([sys.executable, "launch/train.py", "--config", "launch/recipes/demo.yaml", "--output_dir",
                               str(out), "--resume_from_checkpoint", "latest"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert one_rank.returncode != 0 and "holds the state of 2 rank(s)" in one_rank.stderr, one_rank.stderr[-3000:]

    port = free_port()
    try:
        done = subprocess.run(_train_command(port, out, "--resume_from_checkpoint", "latest"), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        remove_shm(port)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"optimizer steps {stopped_at} -> 12" in done.stdout + done.stderr
    assert "step 12:" in done.stdout and f"step {stopped_at}:" not in done.stdout
    assert (out / "model.safetensors").is_file()


def test_resume_refuses_what_is_no_checkpoint_before_any_engine(tmp_path, tokenizer, in_process):
    from sdft_ds import SDFTConfig, SDFTTrainer
    from sdft_ds.assets import DEMO_TRAIN, model_dir
    from sdft_ds.checkpoint import CheckpointError

    args = SDFTConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match="is no sdft_ds checkpoint"):
        SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                    train_dataset=str(DEMO_TRAIN))


def _save(directory: Path, step: int) -> str:
    """What a save leaves for prune: the step folder, then DeepSpeed's `latest` naming it."""
    (directory / f"step-{step}").mkdir()
    (directory / "latest").write_text(f"step-{step}")
    return f"step-{step}"


def test_prune_keeps_the_newest_checkpoints_and_the_latest(tmp_path):
    from sdft_ds.checkpoint import prune

    for step in (2, 4, 10, 12):
        _save(tmp_path, step)
    (tmp_path / "latest").write_text("step-4")  # a hand-edited pointer: never delete what resume would load
    gone = prune(tmp_path, keep=1, saved="step-12")
    assert sorted(p.name for p in gone) == ["step-10", "step-2"]  # step-10 sorts after step-4: by number, not name
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-12", "step-4"]


def test_prune_after_resuming_into_an_older_history_keeps_the_new_checkpoints(tmp_path, caplog):
    from sdft_ds.checkpoint import prune

    for step in (2, 4, 10, 12):
        _save(tmp_path, step)
    # Resumed from step-4: step-10 and step-12 are the abandoned run's. Keeping the highest numbers would delete
    # each new checkpoint as soon as it is written.
    with caplog.at_level("WARNING", logger="sdft_ds.checkpoint"):
        gone = [[p.name for p in prune(tmp_path, keep=2, saved=_save(tmp_path, step))] for step in (5, 6, 7)]
    assert gone == [["step-2"], ["step-4"], ["step-5"]]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-10", "step-12", "step-6", "step-7"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # once, not at every save
    assert "step-10" in warnings[0] and "step-12" in warnings[0] and "step-5" in warnings[0]


def test_save_total_limit_after_resuming_from_an_older_checkpoint(tmp_path):
    launch(["tests/distributed/prune_resume.py", "--out", str(tmp_path)], ranks=1)
    (report,) = read_reports(tmp_path, ranks=1)
    assert report["step"] == 7 and report["latest"] == "step-7"
    # The two newest of the resumed history; the abandoned run's step-10/12 neither take their slots nor vanish.
    assert report["left"] == ["step-10", "step-12", "step-6", "step-7"], report
    assert len(report["warnings"]) == 1 and "step-10" in report["warnings"][0], report
