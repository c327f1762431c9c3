"""Charts of an offline Weights & Biases run as one PNG, without syncing it (matplotlib needed: pip install
matplotlib).

    python benchmarks/plot_wandb_run.py outputs/demo/wandb/offline-run-*/ --out outputs/demo/charts.png

Every folder given is read (a resumed run writes a new offline folder under the same run id); rows are merged by
step, a later folder's winning. Panels: loss and divergence, completion length (mean, p50/p90, min-max band) with
the truncated share, throughput, seconds per phase of a step (stacked), learning rate, teacher syncs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sdft_ds.tracking import PHASES, read_wandb_history  # noqa: E402


def merged_history(folders: list[Path]) -> list[dict]:
    """Metric rows (those with train/loss) of the runs in `folders`, one per step, in step order."""
    by_step: dict[int, dict] = {}
    for folder in sorted(folders):
        run_file = folder if folder.suffix == ".wandb" else next(folder.glob("run-*.wandb"))
        for row in read_wandb_history(run_file):
            if "train/loss" in row:
                by_step[row["_step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["_step"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in rows]

    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    figure.suptitle(title)
    def lines(ax, title: str, curves: tuple[tuple[str, str], ...]) -> None:
        for key, label in curves:
            ax.plot(steps, series(key), label=label)
        ax.set_title(title)
        ax.legend()

    lines(axes[0, 0], "loss", (("train/loss", "loss"), ("train/divergence", "divergence (per token)")))
    ax = axes[0, 1]
    ax.fill_between(steps, series("train/completion_length_min"), series("train/completion_length_max"), alpha=0.2,
                    label="min-max")
    for key, label in (("completion_length", "mean"), ("completion_length_p50", "p50"),
                       ("completion_length_p90", "p90")):
        ax.plot(steps, series(f"train/{key}"), label=label)
    ax.set_title("completion length (tokens)")
    ax.legend(loc="upper left")
    share = ax.twinx()
    share.plot(steps, series("train/clipped_ratio"), color="black", linestyle=":", label="truncated share")
    share.set_ylim(0, 1)
    share.legend(loc="upper right")
    lines(axes[0, 2], "throughput (all ranks)", (("train/tokens_per_second", "prompt + completion tokens/s"),
                                                  ("train/completion_tokens_per_second", "completion tokens/s")))
    ax = axes[1, 0]
    ax.stackplot(steps, *[series(f"time/{p}") for p in PHASES], labels=PHASES)
    ax.set_title("seconds per step, by phase")
    ax.legend(fontsize="small", loc="upper left")
    ax = axes[1, 1]
    ax.plot(steps, series("train/learning_rate"))
    ax.set_title("learning rate")
    lines(axes[1, 2], "counts (running totals)", (("train/teacher_syncs", "teacher syncs"),
                                                   ("train/prompts_truncated", "prompts truncated"),
                                                   ("train/nonfinite_steps", "non-finite steps")))
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="offline-run-* folders (or their run-*.wandb files)")
    parser.add_argument("--out", type=Path, default=Path("wandb_charts.png"))
    args = parser.parse_args()
    rows = merged_history(args.runs)
    if not rows:
        parser.error(f"no logged metrics in {', '.join(map(str, args.runs))}")
    run_id = args.runs[0].name.rsplit("-", 1)[-1].removesuffix(".wandb")
    plot(rows, args.out, f"sdft_ds run {run_id}: steps {rows[0]['_step']}-{rows[-1]['_step']}")
    print(f"{len(rows)} logged steps -> {args.out}")


if __name__ == "__main__":
    main()
