"""Files that must survive interruption: the exported model, resumable training state, stop signals.

Everything is written under a temporary name and moved into place when complete, so an interrupted write
leaves the previous file (or nothing), never a mix that a loader would accept. DeepSpeed writes its `latest`
pointer only after a whole training checkpoint is on disk, so an interrupted save resumes from the one before.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

STATE_FILE = "sdft_state-rank{rank}.pt"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # schedulers' pre-emption warnings; Ctrl-C still aborts


def write_pretrained(lm, state_dict: dict[str, torch.Tensor], tokenizer, output_dir: str) -> None:
    """Rank 0 only: config, generation config, weights (safetensors) and tokenizer of `lm`."""
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        lm.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if not target.exists():
            os.replace(staging, target)  # the common case: one atomic rename
            return
        # The folder also holds training checkpoints, so it is updated file by file: weights first (each
        # rename atomic), then a different shard layout's leftovers, then config and tokenizer.
        new = {item.name for item in staging.iterdir()}
        for name in sorted(new, key=lambda n: not _is_weights(n)):
            os.replace(staging / name, target / name)
            if _is_weights(name):
                for stale in target.glob("model*.safetensors*"):
                    if stale.name not in new:
                        stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_weights(name: str) -> bool:
    return name.startswith("model") and ".safetensors" in name


def upload(folder: str, repo_id: str, private: bool) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload SDFT model (sdft_ds)")


# ---------------------------------------------------------------- resumable training state

def save_state(state: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve(spec: str, output_dir: str) -> tuple[Path, str]:
    """(checkpoints folder, tag) named by `resume_from_checkpoint`; refuses anything that is not one."""
    path = Path(output_dir) / "checkpoints" if spec == "latest" else Path(spec)
    if (path / "latest").is_file():
        folder, tag = path, (path / "latest").read_text().strip()
    else:
        folder, tag = path.parent, path.name
    if not (folder / tag / STATE_FILE.format(rank=0)).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r}: {path} is no sdft_ds checkpoint (expected a `checkpoints` folder "
            f"with a `latest` file, or one of its step-N folders holding {STATE_FILE.format(rank=0)}). "
            "Checkpoints are written every save_steps and when a run is stopped with SIGTERM or SIGUSR1.")
    return folder, tag


def _step_number(name: str) -> int | None:
    number = name.removeprefix("step-")
    return int(number) if name.startswith("step-") and number.isdigit() else None


_reported_abandoned: set[Path] = set()  # warned about once per process, not at every save


def check_world_size(folder: Path, rank: int, world_size: int, any_rank) -> None:
    """Each rank needs its own state file and none may exist past the last rank. `any_rank(flag)` is True on every
    rank when it is on one: ranks refuse as one (node-local checkpoints hold only their node's files)."""
    mine = (folder / STATE_FILE.format(rank=rank)).is_file()
    beyond = (folder / STATE_FILE.format(rank=world_size)).is_file()
    if any_rank(beyond or not mine):
        saved = len(list(folder.glob(STATE_FILE.format(rank="*"))))
        raise ValueError(f"{folder} holds the state of {saved} rank(s) (on rank {rank}'s disk) and this run has "
                         f"{world_size}: rollouts, RNG streams and ZeRO-3 partitions are per rank. Resume with the "
                         "number of ranks that saved it.")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def prune(directory: Path, keep: int, saved: str) -> list[Path]:
    """Delete all but the `keep` newest step-N checkpoints of the current history, never the one `latest` names;
    returns what went.

    `saved` is the tag just written. The current history is what is numbered up to it: after a resume from an
    older checkpoint, folders
    numbered above it belong to the abandoned run. They are neither counted nor deleted (they may be all that is
    left of that run), only named in a warning, once.
    """
    latest = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
    newest = _step_number(saved)
    if newest is None:
        raise ValueError(f"prune needs the step-N tag just saved in {directory}, got {saved!r}.")
    steps = sorted((p for p in directory.glob("step-*") if _step_number(p.name) is not None),
                   key=lambda p: _step_number(p.name))
    current = [p for p in steps if _step_number(p.name) <= newest]
    abandoned = [p for p in steps if _step_number(p.name) > newest and p.resolve() not in _reported_abandoned]
    if abandoned:
        _reported_abandoned.update(p.resolve() for p in abandoned)
        logger.warning("%s: numbered above the checkpoint just saved (%s), so left by the run this one was resumed "
                       "from at an earlier step; save_total_limit neither counts nor deletes them. Delete them by hand "
                       "when no longer needed.", ", ".join(str(p) for p in abandoned), saved)
    doomed = [p for p in current[:-keep] if p.name != latest]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


class StopSignals:
    """While active, SIGTERM and SIGUSR1 only ask the loop to stop at the next optimizer step, where it saves a
    checkpoint first (a scheduler's pre-emption, or the deepspeed launcher passing on a kill, costs no work)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def _request(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
