"""Metrics out of the loop: a progress bar and console lines on rank 0, Weights & Biases when asked.

Other ranks get a tracker that does nothing, so call sites never test the rank.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("sdft_ds")


class Tracker:
    def __init__(self, args, total_steps: int, config: dict):
        from tqdm.auto import tqdm

        self.progress = tqdm(total=total_steps, desc="sdft", dynamic_ncols=True,
                             disable=os.environ.get("SDFT_PROGRESS", "1") == "0")
        self.run = None
        if args.report_to == "wandb":
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sdft_ds"), name=args.run_name,
                                  config=config, dir=os.environ.get("WANDB_DIR", args.output_dir))

    def advance(self, step: int) -> None:
        self.progress.n = step
        self.progress.refresh()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['divergence']:.4f}", refresh=False)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.progress.write(f"step {step}: {shown}")
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def info(self, message: str) -> None:
        self.progress.write(message)

    def close(self) -> None:
        self.progress.close()
        if self.run is not None:
            self.run.finish()


class NullTracker:
    def advance(self, step: int) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def info(self, message: str) -> None: ...

    def close(self) -> None: ...


def make_tracker(args, rank: int, total_steps: int, config: dict):
    return Tracker(args, total_steps, config) if rank == 0 else NullTracker()
