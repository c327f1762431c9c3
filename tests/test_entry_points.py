"""The user-facing entry points run as a user runs them: the seed's Quick Start as a plain script, the
README's demo command, and launch/train.py with a recipe."""

import subprocess
import sys

import pytest

from conftest import REPO, child_env
from helpers import free_port, shm_buffers


def test_quickstart_runs_as_a_plain_single_process_script(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch" / "quickstart.py")], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    assert "optimizer steps 0 -> 1" in done.stdout + done.stderr


@pytest.mark.multirank
def test_demo_command_trains_and_reports_where_the_model_went(tmp_path):
    port = free_port()
    out = tmp_path / "demo"
    done = subprocess.run(["bash", "launch/demo.sh", "--max_steps", "4", "--logging_steps", "2",
                           "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=child_env(MASTER_PORT=str(port)))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    assert f"trained model saved to {out}" in done.stdout
    assert "held-out divergence" in done.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not shm_buffers(port)
