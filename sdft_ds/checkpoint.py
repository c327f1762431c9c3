"""Files that must survive interruption: the exported model, resumable training state, stop signals.

Everything is written under a temporary name and moved into place when complete, so an interrupted write
leaves the previous file (or nothing), never a mix that a loader would accept. A training checkpoint counts once
its completion record (`COMPLETE`) is written, after every rank's files are on disk; resume accepts nothing else,
and `latest` naming an incomplete one (a kill during the save) resumes from the complete one before it.
"""

from __future__ import annotations

import json
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
# What a run writes beside the model in output_dir (resumable state is ~13x the model), left out of an upload.
UPLOAD_IGNORE = ["checkpoints/*", "wandb/*", "runs/*", ".*"]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # schedulers' pre-emption warnings; Ctrl-C still aborts


def write_pretrained(lm, state_dict: dict[str, torch.Tensor], tokenizer, output_dir: str) -> None:
    """Rank 0 only: config, generation config, weights (safetensors) and tokenizer of `lm`."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    write_folder(lambda staging: lm.save_pretrained(staging, state_dict=state_dict, safe_serialization=True),
                 tokenizer, output_dir)


def write_adapter(peft_model, adapter: str, state_dict: dict[str, torch.Tensor], tokenizer, output_dir: str) -> None:
    """Rank 0 only: a LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors; loads with
    PeftModel.from_pretrained) and the tokenizer. `state_dict`: the adapter's weights named as in the PeftModel."""
    write_folder(lambda staging: peft_model.save_pretrained(staging, state_dict=state_dict, selected_adapters=[adapter],
                                                            save_embedding_layers=False, safe_serialization=True),
                 tokenizer, output_dir)


def write_folder(save, tokenizer, output_dir: str) -> None:
    """Rank 0 only: what `save(folder)` writes, and the tokenizer, into `output_dir` without ever leaving it
    half-written: written to a staging folder beside it, then moved in."""
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the model private to its writer
    try:
        save(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for item in staging.iterdir():  # some writers create their files 0600 too
            os.chmod(item, 0o666 & ~umask)
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
    return name.startswith(("model", "adapter_model")) and ".safetensors" in name


def upload(folder: str, repo_id: str, private: bool) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload SDFT model (sdft_ds)",
                      ignore_patterns=UPLOAD_IGNORE)


# ---------------------------------------------------------------- resumable training state

def save_state(state: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


COMPLETE = "sdft_complete.json"  # written into step-N last, after a barrier: every rank's files are on disk


class CheckpointError(ValueError):
    """A checkpoint that this run cannot resume from; raised on every rank before any engine is built."""


def _find(spec: str, output_dir: str) -> tuple[Path, str]:
    """(checkpoints folder, tag) that `resume_from_checkpoint` names on this rank's disk. `latest` and a folder
    holding step-N folders mean the newest *complete* checkpoint: DeepSpeed's `latest`, or when a save was
    interrupted after DeepSpeed wrote it, the newest complete one numbered below it."""
    path = Path(output_dir) / "checkpoints" if spec == "latest" else Path(spec)
    if not (path / "latest").is_file():
        return path.parent, path.name
    named = (path / "latest").read_text().strip()
    if (path / named / COMPLETE).is_file():
        return path, named
    limit = step_number(named)
    earlier = sorted((p for p in path.glob("step-*") if (p / COMPLETE).is_file() and step_number(p.name) is not None
                      and (limit is None or step_number(p.name) < limit)), key=lambda p: step_number(p.name))
    if not earlier:
        raise CheckpointError(f"{path / named} was never completed (no {COMPLETE}: the run was most likely killed "
                              "while saving it) and no complete checkpoint precedes it. Start the run afresh.")
    logger.warning("%s was never completed (the run was most likely killed while saving it); resuming from %s.",
                   path / named, earlier[-1])
    return path, earlier[-1].name


def open_checkpoint(spec: str, output_dir: str, rank: int, world_size: int) -> tuple[Path, str, dict]:
    """This rank's view of the checkpoint to resume: (folder, tag, its completion record), or CheckpointError
    naming what is wrong. Every rank checks its own disk (node-local checkpoints hold only their node's files);
    the caller decides together."""
    folder, tag = _find(spec, output_dir)
    step = folder / tag
    if not (step / COMPLETE).is_file():
        ours = any(step.glob(STATE_FILE.format(rank="*")))
        what = ("was never completed (the run was most likely killed while saving it)" if ours
                else "is no sdft_ds checkpoint")
        raise CheckpointError(
            f"resume_from_checkpoint={spec!r}: {step} {what} (on rank {rank}'s disk). Expected a `checkpoints` folder "
            f"with a `latest` file, or one of its step-N folders holding {COMPLETE}. Checkpoints are written every "
            "save_steps and when a run is stopped with SIGTERM or SIGUSR1.")
    try:
        record = json.loads((step / COMPLETE).read_text())
        saved_ranks = int(record["world_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{step / COMPLETE} is damaged ({error!r}); resume from an earlier step-N.") from None
    mine = step / STATE_FILE.format(rank=rank)
    if saved_ranks != world_size or not mine.is_file():
        raise CheckpointError(
            f"{step} holds the state of {saved_ranks} rank(s) and this run has {world_size}"
            + ("" if saved_ranks != world_size else f", but rank {rank} finds no {mine.name} on its disk (were the "
               "checkpoints written with save_on_each_node on another node?)")
            + ": rollouts, RNG streams and ZeRO-3 partitions are per rank. Resume with the ranks that saved it.")
    try:
        record["state"] = load_state(mine)
        int(record["state"]["step"])
    except Exception as error:  # a damaged state file must fail here, not after the engines are built
        raise CheckpointError(f"{mine} cannot be read ({type(error).__name__}: {error}); resume from an earlier "
                              "step-N.") from None
    return folder, tag, record


def mark_complete(step: Path, record: dict) -> None:
    """The completion record of a checkpoint, written atomically once every rank's files are on disk, then
    `latest` naming it: DeepSpeed writes that pointer on global rank 0 only, so other nodes' disks lack it."""
    for path, text in ((step / COMPLETE, json.dumps(record, indent=1, sort_keys=True, default=str)),
                       (step.parent / "latest", step.name)):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)


def write_failure(step: Path, error: BaseException) -> str:
    """What to tell a user whose checkpoint could not be written, with the free space of its disk."""
    disk = next((p for p in (step, *step.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(disk).free / 2**30
    return (f"Writing checkpoint {step} failed ({type(error).__name__}: {error}); {free:.1f} GiB are free on its "
            "disk (a full disk shows in torch.save as 'unexpected pos'). It never completed, so resume ignores it; "
            "the previous complete checkpoint is intact. Free space, or set save_total_limit.")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The entries of the run's fingerprint that differ from the checkpoint's, as `name: saved -> now`."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def step_number(name: str) -> int | None:
    number = name.removeprefix("step-")
    return int(number) if name.startswith("step-") and number.isdigit() else None


_reported_abandoned: set[Path] = set()  # warned about once per process, not at every save


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
    newest = step_number(saved)
    if newest is None:
        raise ValueError(f"prune needs the step-N tag just saved in {directory}, got {saved!r}.")
    steps = sorted((p for p in directory.glob("step-*") if step_number(p.name) is not None),
                   key=lambda p: step_number(p.name))
    current = [p for p in steps if step_number(p.name) <= newest]
    abandoned = [p for p in steps if step_number(p.name) > newest and p.resolve() not in _reported_abandoned]
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
