"""Metrics out of the loop: a progress bar and console lines on rank 0, Weights & Biases when asked.

Other ranks get a tracker that does nothing, so call sites never test the rank.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time

logger = logging.getLogger("sdft_ds")

PHASES = ("generation", "teacher_forward", "student_forward", "backward", "optimizer_step", "teacher_sync",
          "checkpoint")


class PhaseClock:
    """Wall-clock seconds per phase of a step, and of the whole step (`step`). The accelerator is synchronised at
    every boundary, so asynchronous GPU work is charged to the phase that queued it (a no-op on CPU).

        with PhaseClock(sync) as clock:
            with clock("generation"): ...
    """

    def __init__(self, synchronize):
        self.synchronize = synchronize
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def __enter__(self) -> PhaseClock:
        self.synchronize()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.synchronize()
        self.seconds["step"] += time.perf_counter() - self._started

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[phase] += time.perf_counter() - started


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
        if self.run is not None:  # "time/<phase>" keys make their own W&B section
            self.run.log({k if "/" in k else f"train/{k}": v for k, v in metrics.items()}, step=step)

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
