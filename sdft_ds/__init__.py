"""sdft_ds: Self-Distillation Fine-Tuning (arXiv 2601.19897) on DeepSpeed ZeRO-3."""

from sdft_ds.config import SDFTConfig

__all__ = ["SDFTConfig", "SDFTTrainer"]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer imports deepspeed; keep `import sdft_ds` (config, recipes) light.
    if name == "SDFTTrainer":
        from sdft_ds.trainer import SDFTTrainer

        return SDFTTrainer
    raise AttributeError(f"module 'sdft_ds' has no attribute {name!r}")
