"""Shared test plumbing: CPU DeepSpeed environment, a 2-rank launcher, the shipped tiny assets. Helpers that the
tests/distributed scripts share too live in helpers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, remove_shm

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("SDFT_PROGRESS", "0")
# The venv's bin first, as tests/run.sh has it: torch JIT-builds DeepSpeed's ops with whichever `ninja` is on PATH,
# and the venv's (1.13) and the system's (1.11) each take the other's build log as stale, rebuilding every op
# (minutes) whenever a test's subprocess finds the other one.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict:
    """The environment for a subprocess: without the rendezvous variables that a trainer built in this process put
    there (a child would take itself for that one-rank group and its port, still held)."""
    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS}, **extra}


def launch(command: list[str], timeout: int = 900, env: dict | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """Run `command` (after `deepspeed --num_gpus N --master_port P`) and fail with its output on error."""
    port = free_port()
    full = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
            *command]
    try:
        done = subprocess.run(full, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=child_env(**(env or {})))
    finally:
        remove_shm(port)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n"
                    f"--- stderr\n{done.stderr[-8000:]}")
    return done


def run_python(command: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**(env or {})))
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n"
                    f"--- stderr\n{done.stderr[-8000:]}")
    return done


def read_reports(directory: Path, ranks: int = 2) -> list[dict]:
    return [json.loads((directory / f"report-rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from sdft_ds.assets import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def in_process():
    """For tests that build a trainer in the pytest process: afterwards no registered ZeRO-3 config (later
    from_pretrained calls here would build partitioned models). The one-rank process group stays: DeepSpeed caches
    it, so the next in-process trainer reuses it (subprocesses get `child_env`)."""
    yield
    from sdft_ds import engines

    engines.forget_hf_config()
