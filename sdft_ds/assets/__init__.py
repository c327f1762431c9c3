"""Paths of the committed offline assets (demo data, tokenizer, tiny models).

Tests and examples run with no model or dataset hub, so everything they load lives here.
Only `pathlib` is imported so that looking up a path stays free. Rebuild with
`PYTHONPATH=. python -m sdft_ds.assets.build_assets`.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
DEMO_DIR = ASSETS_DIR / "demo"
DEMO_TRAIN = DEMO_DIR / "train.jsonl"
DEMO_TRAIN_CHAT = DEMO_DIR / "train_chat.jsonl"
DEMO_HELDOUT = DEMO_DIR / "heldout.jsonl"
DEMO_HELDOUT_CHAT = DEMO_DIR / "heldout_chat.jsonl"
MODELS_DIR = ASSETS_DIR / "models"
MODEL_NAMES = ("tiny-qwen2-student", "tiny-qwen2-teacher", "tiny-llama")


def model_dir(name: str) -> Path:
    """Folder of a tiny model, loadable with `from_pretrained`; unknown names fail loudly."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return MODELS_DIR / name
