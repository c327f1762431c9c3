"""Metrics out of the loop: a progress bar and console lines on rank 0, Weights & Biases when asked.

Other ranks get a tracker that does nothing, so call sites never test the rank.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time

import torch

from sdft_ds import engines

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


class StepStats:
    """One logging window: loss metrics summed on the device (no host synchronisation per micro-batch), step
    times on the host; `reduce` brings both over all ranks with three collectives, the window's only sync."""

    DEVICE_SUMS = ("loss", "micro_batches", "divergence", "entropy", "loss_tokens", "length", "completions",
                   "truncated", "ratio", "ratio_tokens", "ratio_clipped")
    HOST_SUMS = ("step", "tokens", "steps", *PHASES)
    EXTREMES = ("length", "ratio")

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(len(self.DEVICE_SUMS), dtype=torch.float64, device=device)
        self.host = dict.fromkeys(self.HOST_SUMS, 0.0)
        self.mins = torch.full((len(self.EXTREMES),), math.inf, dtype=torch.float64, device=device)
        self.maxs = torch.full((len(self.EXTREMES),), -math.inf, dtype=torch.float64, device=device)

    def add_step(self, seconds: dict[str, float], steps: int = 1) -> None:
        """A step's (or a checkpoint's) phase seconds, total seconds and tokens, from `train_step`/`PhaseClock`."""
        for name in ("step", "tokens", *PHASES):
            self.host[name] += seconds.get(name, 0.0)
        self.host["steps"] += steps

    def add(self, batch, out, is_clip: float | None) -> None:
        """A micro-batch (`batch.MicroBatch`) and its `DivergenceOutput`."""
        as_sum = dict.fromkeys(self.DEVICE_SUMS, torch.zeros((), dtype=torch.float64, device=self.device))
        loss_mask = batch.loss_mask[batch.selected].double()
        lengths = batch.completion_mask.sum(-1).double()
        as_sum.update(loss=out.loss.detach().double(), micro_batches=torch.ones_like(lengths[0]),
                      divergence=(out.per_token.double() * loss_mask).sum(),
                      entropy=(out.entropy.double() * loss_mask).sum(), loss_tokens=loss_mask.sum(),
                      length=lengths.sum(), completions=torch.full_like(lengths[0], len(lengths)),
                      truncated=batch.truncated.double().sum().to(self.device))
        low, high = [lengths.min(), self.mins[1]], [lengths.max(), self.maxs[1]]
        if out.ratio is not None:
            ratio = out.ratio.double()
            as_sum.update(ratio=(ratio * loss_mask).sum(), ratio_tokens=loss_mask.sum())
            if is_clip is not None:
                as_sum["ratio_clipped"] = ((ratio >= is_clip) * loss_mask).sum()
            low[1], high[1] = torch.minimum(self.mins[1], ratio.min()), torch.maximum(self.maxs[1], ratio.max())
        self.sums += torch.stack([as_sum[k].to(self.device) for k in self.DEVICE_SUMS])
        self.mins = torch.minimum(self.mins, torch.stack(low))
        self.maxs = torch.maximum(self.maxs, torch.stack(high))

    def reduce(self, world_size: int, counts: dict[str, float] | None = None) -> dict[str, float]:
        """Means over the window and all ranks. Times are per optimizer step, averaged over ranks; tokens/s is
        the prompt + completion tokens trained on all ranks per second of (mean) step time. `counts` (this rank's
        running totals, e.g. truncated prompts) come back summed over ranks."""
        counts = counts or {}
        host = torch.tensor([self.host[k] for k in self.HOST_SUMS] + list(counts.values()), dtype=torch.float64,
                            device=self.device)
        totals = engines.all_reduce_sum(torch.cat([self.sums, host]))
        mins = engines.all_reduce_min(self.mins.clone())
        maxs = -engines.all_reduce_min(-self.maxs)
        t = dict(zip(self.DEVICE_SUMS + self.HOST_SUMS + tuple(counts), totals.cpu().tolist()))
        low, high = dict(zip(self.EXTREMES, mins.cpu().tolist())), dict(zip(self.EXTREMES, maxs.cpu().tolist()))
        tokens, steps = max(t["loss_tokens"], 1.0), max(t["steps"], 1.0)
        metrics = {"loss": t["loss"] / t["micro_batches"], "divergence": t["divergence"] / tokens,
                   "entropy": t["entropy"] / tokens, "completion_length": t["length"] / t["completions"],
                   "completion_length_min": low["length"], "completion_length_max": high["length"],
                   "clipped_ratio": t["truncated"] / t["completions"], "step_time": t["step"] / steps,
                   "tokens_per_second": t["tokens"] / max(t["step"] / world_size, 1e-9),
                   **{f"time/{phase}": t[phase] / steps for phase in PHASES}, **{k: t[k] for k in counts}}
        if t["ratio_tokens"]:
            metrics.update(is_ratio_mean=t["ratio"] / t["ratio_tokens"], is_ratio_min=low["ratio"],
                           is_ratio_max=high["ratio"], is_ratio_clipped=t["ratio_clipped"] / t["ratio_tokens"])
        return metrics


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
