"""Model export that never leaves a half-written checkpoint.

Files are written into a temporary sibling folder and moved into place only when complete, so an
interrupted save leaves the previous model (or nothing) — never a mix that `from_pretrained` would load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


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
        for stale in target.glob("model*.safetensors*"):  # a different shard layout must not linger
            stale.unlink()
        for item in staging.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def upload(folder: str, repo_id: str, private: bool) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload SDFT model (sdft_ds)")
