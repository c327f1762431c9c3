"""The console of a job as a person reads it, its output going to a pipe (a log file, a scheduler's capture): the
demo command on 2 ranks shows rank 0's progress once, keeps DeepSpeed's own logs at WARNING unless asked, never
redraws a progress bar, and ends with one summary line naming the steps, time, tokens/s and the model's folder."""

import re
import subprocess

import pytest

from conftest import REPO, child_env
from helpers import free_port, remove_shm

pytestmark = pytest.mark.multirank

LAUNCHER = re.compile(r"\[(runner|launch)\.py:\d+:")  # the deepspeed launcher's own lines (its --log_level)


def _demo(out, *extra: str) -> subprocess.CompletedProcess:
    """The demo command, its output to pipes; without conftest's SDFT_PROGRESS=0, as a user runs it."""
    port = free_port()
    env = {k: v for k, v in child_env(WANDB_MODE="disabled").items() if k != "SDFT_PROGRESS"}
    try:
        done = subprocess.run(["bash", "launch/run.sh", "--num_gpus", "2", "--master_port", str(port),
                               "launch/train.py", "--config", "launch/recipes/demo.yaml", "--output_dir", str(out),
                               *extra], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    finally:
        remove_shm(port)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return done


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("console") / "demo"
    return out, _demo(out, "--max_steps", "4", "--logging_steps", "2")


def test_rank_zero_reports_once_and_deepspeed_stays_at_warning(demo):
    out, done = demo
    log = done.stdout + done.stderr
    ranks_info = [line for line in log.splitlines() if "[INFO]" in line and not LAUNCHER.search(line)]
    assert not ranks_info, ranks_info[:5]
    assert log.count("optimizer steps 0 -> 4") == 1
    assert log.count("INFO sdft_ds.rollout: Generation path") == 1  # sdft_ds's own INFO lines: rank 0's only
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("step ")] == ["step 2", "step 4"]


def test_no_progress_bar_is_redrawn_into_a_pipe(demo):
    _, done = demo
    log = done.stdout + done.stderr
    assert "\r" not in log
    assert "sdft:" not in log and "Writing model shards" not in log  # tqdm bars: one copy per redraw in a pipe


def test_the_job_ends_with_one_summary_line(demo):
    out, done = demo
    summaries = [line for line in done.stdout.splitlines() if line.startswith("done: ")]
    assert len(summaries) == 1, done.stdout[-3000:]
    match = re.fullmatch(r"done: 4 optimizer steps \(4 in this run\), ([\d.]+) s of training, ([\d,]+) tokens/s; "
                         r"trained model saved to (.+)", summaries[0])
    assert match and float(match[1]) > 0 and int(match[2].replace(",", "")) > 0, summaries[0]
    assert match[3] == str(out.resolve())


def test_the_launcher_stays_at_warning(demo):
    _, done = demo
    assert "[INFO]" not in done.stdout + done.stderr


def test_deepspeed_logs_at_info_when_asked(tmp_path):
    done = _demo(tmp_path / "demo", "--max_steps", "1", "--eval_dataset_name", "none", "--deepspeed_log_level", "info")
    ranks_info = [line for line in (done.stdout + done.stderr).splitlines()
                  if "[INFO]" in line and not LAUNCHER.search(line)]
    assert any("DeepSpeed info: version=" in line for line in ranks_info), ranks_info[:5]
