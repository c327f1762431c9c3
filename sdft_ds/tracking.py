"""Metrics out of the loop: console lines (a progress bar on a terminal) on rank 0, Weights & Biases or
TensorBoard when asked, with a table of sampled completions and their per-token divergence.

Other ranks get a tracker that does nothing, so call sites never test the rank.
"""

from __future__ import annotations

import collections
import contextlib
import html
import json
import logging
import math
import os
import struct
import sys
import time
from pathlib import Path

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
    times on the host; `reduce` brings both over all ranks with three collectives, the window's only sync.
    `max_length` (max_completion_length) sizes the completion-length histogram, one bin per length."""

    DEVICE_SUMS = ("loss", "micro_batches", "divergence", "entropy", "loss_tokens", "length", "completions",
                   "truncated", "ratio", "ratio_tokens", "ratio_clipped")
    HOST_SUMS = ("step", "tokens", "completion_tokens", "steps", *PHASES)
    EXTREMES = ("length", "ratio")

    def __init__(self, device: torch.device, max_length: int = 0):
        self.device = device
        self.sums = torch.zeros(len(self.DEVICE_SUMS), dtype=torch.float64, device=device)
        self.host = dict.fromkeys(self.HOST_SUMS, 0.0)
        self.mins = torch.full((len(self.EXTREMES),), math.inf, dtype=torch.float64, device=device)
        self.maxs = torch.full((len(self.EXTREMES),), -math.inf, dtype=torch.float64, device=device)
        self.length_counts = torch.zeros(max_length + 1, dtype=torch.float64, device=device)  # [length] completions
        self.length_histogram: list[float] = []  # length_counts over all ranks, after reduce

    def add_step(self, seconds: dict[str, float], steps: int = 1) -> None:
        """A step's (or a checkpoint's) phase seconds, total seconds and tokens, from `train_step`/`PhaseClock`."""
        for name in ("step", "tokens", "completion_tokens", *PHASES):
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
        bins = len(self.length_counts)
        self.length_counts += torch.bincount(lengths.long().clamp(max=bins - 1), minlength=bins).to(self.length_counts)
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
        running totals, e.g. truncated prompts) come back summed over ranks; the completion-length histogram over
        all ranks is left in `length_histogram`."""
        counts = counts or {}
        host = torch.tensor([self.host[k] for k in self.HOST_SUMS] + list(counts.values()), dtype=torch.float64,
                            device=self.device)
        totals = engines.all_reduce_sum(torch.cat([self.sums, host, self.length_counts])).cpu().tolist()
        mins = engines.all_reduce_min(self.mins.clone())
        maxs = -engines.all_reduce_min(-self.maxs)
        names = self.DEVICE_SUMS + self.HOST_SUMS + tuple(counts)
        t, self.length_histogram = dict(zip(names, totals)), totals[len(names):]
        low, high = dict(zip(self.EXTREMES, mins.cpu().tolist())), dict(zip(self.EXTREMES, maxs.cpu().tolist()))
        tokens, steps, seconds = max(t["loss_tokens"], 1.0), max(t["steps"], 1.0), max(t["step"] / world_size, 1e-9)
        metrics = {"loss": t["loss"] / t["micro_batches"], "divergence": t["divergence"] / tokens,
                   "entropy": t["entropy"] / tokens, "completion_length": t["length"] / t["completions"],
                   "completion_length_min": low["length"], "completion_length_max": high["length"],
                   **{f"completion_length_p{q}": _quantile(self.length_histogram, q / 100) for q in (50, 90)},
                   "clipped_ratio": t["truncated"] / t["completions"], "completions_truncated": t["truncated"],
                   "completions": t["completions"], "step_time": t["step"] / steps,
                   "tokens_per_second": t["tokens"] / seconds,
                   "completion_tokens_per_second": t["completion_tokens"] / seconds,
                   **{f"time/{phase}": t[phase] / steps for phase in PHASES}, **{k: t[k] for k in counts}}
        if t["ratio_tokens"]:
            metrics.update(is_ratio_mean=t["ratio"] / t["ratio_tokens"], is_ratio_min=low["ratio"],
                           is_ratio_max=high["ratio"], is_ratio_clipped=t["ratio_clipped"] / t["ratio_tokens"])
        return metrics


def _quantile(histogram: list[float], q: float) -> float:
    """The smallest length (bin) below or at which a fraction q of the counted completions lie."""
    total, running = sum(histogram), 0.0
    for length, count in enumerate(histogram):
        running += count
        if running >= q * total:
            return float(length)
    return 0.0


# ---------------------------------------------------------------- what rank 0 shows and reports

def set_deepspeed_log_level(level: str) -> None:
    """DeepSpeed's logger ("DeepSpeed", with its own stdout handler) and its handlers at `level` (a name in
    config.LOG_LEVELS), as DeepSpeed's own set_log_level_from_string does; stdlib logging only."""
    logger = logging.getLogger("DeepSpeed")
    number = logging.getLevelName(level.upper())
    logger.setLevel(number)
    for handler in logger.handlers:
        handler.setLevel(number)


CONSOLE = (("loss", "loss", "{:.4f}"), ("divergence", "divergence", "{:.4f}"), ("entropy", "entropy", "{:.3f}"),
           ("completion_length", "length", "{:.1f}"), ("clipped_ratio", "truncated", "{:.0%}"),
           ("learning_rate", "lr", "{:.2e}"), ("tokens_per_second", "tokens/s", "{:,.0f}"),
           ("step_time", "s/step", "{:.3g}"))
SHORT_PHASES = {"generation": "gen", "teacher_forward": "teacher", "student_forward": "student",
                "backward": "backward", "optimizer_step": "optim", "teacher_sync": "sync", "checkpoint": "ckpt"}


def console_line(metrics: dict[str, float], step: int, total_steps: int, elapsed: float) -> str:
    """`step 10: loss 1.7720 | ... | time gen 11% teacher 24% ... | 10/40 12s, eta 36s`: the main numbers and where
    the step's time goes; every metric goes to report_to."""
    shown = [f"{label} {form.format(metrics[key])}" + (
        f" ({metrics['completion_length_min']:.0f}-{metrics['completion_length_max']:.0f})"
        if key == "completion_length" and "completion_length_max" in metrics else "")
        for key, label, form in CONSOLE if key in metrics]
    step_time = max(metrics.get("step_time", 0.0), 1e-9)
    phases = [f"{SHORT_PHASES[p]} {metrics[f'time/{p}'] / step_time:.0%}" for p in PHASES
              if metrics.get(f"time/{p}", 0.0) / step_time >= 0.005]
    if phases:
        shown.append("time " + " ".join(phases))
    eta = elapsed / max(step, 1) * (total_steps - step)
    return f"step {step}: {' | '.join(shown)} | {step}/{total_steps} {elapsed:.0f}s, eta {eta:.0f}s"


def sample_rows(batch, per_token: torch.Tensor, tokenizer, rows: int) -> list[dict]:
    """The first `rows` completions of a micro-batch (`batch.MicroBatch`) with their per-token divergence
    (`DivergenceOutput.per_token`, [N] over `batch.selected`), decoded for a sample table. Host work only."""
    selected = batch.selected[:rows].cpu()
    per_token = per_token.detach()[: int(selected.sum())].double().cpu()
    out, used = [], 0
    for row in range(selected.shape[0]):
        n = int(selected[row].sum())
        ids = batch.completion_ids[row].cpu()[selected[row]].tolist()
        values = per_token[used:used + n].tolist()
        used += n
        prompt = batch.input_ids[row, :batch.start].cpu()[batch.attention_mask[row, :batch.start].cpu().bool()]
        teacher = batch.teacher_input_ids[row, :batch.teacher_start].cpu()[
            batch.teacher_attention_mask[row, :batch.teacher_start].cpu().bool()]
        out.append({"prompt": tokenizer.decode(prompt.tolist()), "teacher_prompt": tokenizer.decode(teacher.tolist()),
                    "completion": tokenizer.decode(ids), "tokens": [tokenizer.decode([i]) for i in ids],
                    "divergence": values,
                    "truncated": bool(batch.truncated[row])})
    return out


def _highlighted(tokens: list[str], values: list[float]) -> str:
    """HTML of the completion, each token's background as red as its divergence is large (relative to the row's
    largest); the value shows on hover."""
    top = max(values, default=0.0) or 1.0
    spans = "".join(f'<span title="{v:.4f}" style="background: rgba(255,0,0,{max(v, 0.0) / top:.2f})">'
                    f"{html.escape(t)}</span>" for t, v in zip(tokens, values))
    return f'<pre style="white-space: pre-wrap">{spans}</pre>'


def _per_token_text(tokens: list[str], values: list[float]) -> str:
    """`[["Hello", 0.0123], [" world", 1.5]]`: each completion token with its divergence, as JSON."""
    return json.dumps([[t, round(v, 4)] for t, v in zip(tokens, values)], ensure_ascii=False)


class _Wandb:
    """A Weights & Biases run. `run_id` (from a checkpoint) continues that run (resume="allow")."""

    def __init__(self, args, config: dict, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sdft_ds"), name=args.run_name, config=config,
                              dir=os.environ.get("WANDB_DIR", args.output_dir), id=run_id,
                              resume="allow" if run_id else None, allow_val_change=bool(run_id))

    def state(self) -> dict:
        return {"wandb_run_id": self.run.id}

    def log(self, metrics: dict[str, float], histogram: list[float], step: int) -> None:
        row = {k if "/" in k else f"train/{k}": v for k, v in metrics.items()}  # "time/<phase>": its own section
        if histogram and sum(histogram):
            edges = [i - 0.5 for i in range(len(histogram) + 1)]
            row["train/completion_length_hist"] = self.wandb.Histogram(np_histogram=(histogram, edges))
        self.run.log(row, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "teacher_prompt", "completion", "divergence_mean",
                                          "divergence_max", "truncated", "per_token_divergence", "highlighted"])
        for r in rows:
            values = r["divergence"]
            table.add_data(step, r["prompt"], r["teacher_prompt"], r["completion"],
                           sum(values) / max(len(values), 1), max(values, default=0.0), r["truncated"],
                           _per_token_text(r["tokens"], values), self.wandb.Html(_highlighted(r["tokens"], values)))
        self.run.log({"samples": table}, step=step)

    def close(self, summary: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in summary.items()})
        self.run.finish()


class _TensorBoard:
    """Event files in <output_dir>/runs/<run> (Hugging Face's place), continued by a resumed run: the folder is
    stored in the checkpoint, and events after the resumed step (left by the interrupted run) are purged."""

    def __init__(self, args, log_dir: str | None, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = log_dir or str(Path(args.output_dir) / "runs" / name)
        self.writer = SummaryWriter(self.log_dir, purge_step=start_step + 1 if log_dir else None)

    def state(self) -> dict:
        return {"tensorboard_dir": self.log_dir}

    def log(self, metrics: dict[str, float], histogram: list[float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        total = sum(histogram)
        if total:
            lengths = [i for i, c in enumerate(histogram) if c]
            self.writer.add_histogram_raw(
                "train/completion_length", min=lengths[0], max=lengths[-1], num=total,
                sum=sum(i * c for i, c in enumerate(histogram)),
                sum_squares=sum(i * i * c for i, c in enumerate(histogram)),
                bucket_limits=[i + 0.5 for i in range(len(histogram))], bucket_counts=histogram, global_step=step)
        self.writer.flush()

    def log_samples(self, rows: list[dict], step: int) -> None:
        def cell(text: str) -> str:
            return html.escape(text).replace("|", "&#124;").replace("\n", "<br>")

        lines = ["| prompt | teacher prompt | completion | mean divergence | per-token divergence |",
                 "|---|---|---|---|---|"]
        for r in rows:
            values = r["divergence"]
            lines.append(f"| {cell(r['prompt'])} | {cell(r['teacher_prompt'])} | {cell(r['completion'])} | "
                         f"{sum(values) / max(len(values), 1):.4f} | {cell(_per_token_text(r['tokens'], values))} |")
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self, summary: dict) -> None:
        self.writer.add_text("summary", " ".join(f"{k}={v}" for k, v in summary.items()))
        self.writer.close()


class Tracker:
    """Rank 0: console lines (and a progress bar on a terminal), the report_to backend."""

    def __init__(self, args, total_steps: int, config: dict, resume: dict | None = None, start_step: int = 0):
        from tqdm.auto import tqdm

        resume = resume or {}
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.perf_counter()
        # a bar only on a terminal: to a pipe or file tqdm writes a new copy per redraw; the step lines suffice there
        shown = os.environ.get("SDFT_PROGRESS", "1") != "0" and sys.stderr.isatty()
        self.progress = tqdm(total=total_steps, initial=start_step, desc="sdft", dynamic_ncols=True,
                             disable=not shown)
        self.backend = None
        if args.report_to == "wandb":
            self.backend = _Wandb(args, config, resume.get("wandb_run_id"))
        elif args.report_to == "tensorboard":
            self.backend = _TensorBoard(args, resume.get("tensorboard_dir"), start_step)

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run reports to the same run (W&B id, TensorBoard folder)."""
        return self.backend.state() if self.backend is not None else {}

    def advance(self, step: int) -> None:
        self.progress.n = step
        self.progress.refresh()

    def log(self, metrics: dict[str, float], step: int, histogram: list[float] | None = None) -> None:
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['divergence']:.4f}", refresh=False)
        elapsed = time.perf_counter() - self.started
        self.progress.write(console_line(metrics, step, self.total_steps, elapsed), file=sys.stdout)
        if self.backend is not None:
            self.backend.log(metrics, histogram or [], step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        if self.backend is not None and rows:
            self.backend.log_samples(rows, step)

    def info(self, message: str) -> None:
        self.progress.write(message, file=sys.stdout)

    def close(self, summary: dict | None = None) -> None:
        self.progress.close()
        if self.backend is not None:
            self.backend.close(summary or {})


class NullTracker:
    def state(self) -> dict:
        return {}

    def advance(self, step: int) -> None: ...

    def log(self, metrics: dict[str, float], step: int, histogram: list[float] | None = None) -> None: ...

    def log_samples(self, rows: list[dict], step: int) -> None: ...

    def info(self, message: str) -> None: ...

    def close(self, summary: dict | None = None) -> None: ...


def make_tracker(args, rank: int, total_steps: int, config: dict, resume: dict | None = None, start_step: int = 0):
    """The tracker of rank 0; a no-op on the others, so that no call site tests the rank and no W&B code runs
    there."""
    return Tracker(args, total_steps, config, resume, start_step) if rank == 0 else NullTracker()


def read_wandb_history(run_file) -> list[dict]:
    """History rows of an offline W&B run file (`wandb/offline-run-*/run-<id>.wandb`), nested keys joined with "/",
    for reading a run back without syncing it (tests, benchmarks/plot_wandb_run.py). The file is a LevelDB-style
    log (32 KiB blocks, 7-byte record headers) of protobuf records, read the way `wandb sync` does."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, pending, rows = Path(run_file).read_bytes(), 32768, 7, b"", []  # 7: the ':W&B' file header
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows
