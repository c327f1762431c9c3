"""Gather every run's results.jsonl: a Markdown table of the final scores per run kind (mean ± standard deviation over
seeds, and the change from the pretrained model) and a PNG of new-skill and prior-average accuracy against step.

    python examples/continual/report.py --runs outputs/continual/runs --out examples/continual/results
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from sdft_ds.evaluate import read_results


def load(runs: Path) -> list[dict]:
    rows = []
    for path in sorted(runs.glob("*/results.jsonl")):
        rows += read_results(path)
    if not rows:
        raise SystemExit(f"no */results.jsonl under {runs}; run finetune.py first.")
    return rows


def curves(rows: list[dict]) -> dict:
    """{(run, seed, step): {eval_set: score, 'prior avg': mean of the prior sets}}."""
    points: dict = defaultdict(dict)
    for r in rows:
        points[r["run"], r["seed"], r["step"]][r["eval_set"]] = r["score"]
    prior = sorted({r["eval_set"] for r in rows if r["role"] == "prior"})
    for scores in points.values():
        scores["prior avg"] = statistics.fmean(scores[s] for s in prior)
    return points


def order(rows: list[dict]) -> list[str]:
    """Run kinds, the baseline (SFT) first, the others as first seen."""
    return sorted(dict.fromkeys(r["run"] for r in rows), key=lambda run: run != "SFT")


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict]) -> str:
    points = curves(rows)
    new = list(dict.fromkeys(r["eval_set"] for r in rows if r["role"] == "new"))
    prior = list(dict.fromkeys(r["eval_set"] for r in rows if r["role"] == "prior"))
    columns = [*new, *prior, "prior avg"]
    runs = order(rows)
    seeds = {m: sorted({k[1] for k in points if k[0] == m}) for m in runs}
    last = {m: max(k[2] for k in points if k[0] == m) for m in runs}
    base = {c: points[runs[0], seeds[runs[0]][0], 0][c] for c in columns}  # every run starts from this model
    header = ["model", *columns, "Δ prior avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
             "| pretrained | " + " | ".join(f"{100 * base[c]:.1f}" for c in columns) + " | — |"]
    for run, step in last.items():
        cells = []
        for c in columns:
            mean, std = spread([points[run, s, step][c] for s in seeds[run]])
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
        delta = spread([points[run, s, step]["prior avg"] - base["prior avg"] for s in seeds[run]])
        cells.append(f"{100 * delta[0]:+.1f} ± {100 * delta[1]:.1f}")
        lines.append(f"| {run} (step {step}, seeds {', '.join(map(str, seeds[run]))}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Three panels: new-skill accuracy and prior-skill average against step (mean over seeds, band: min–max), and
    the two against each other (the trade-off, one point per evaluated step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curves(rows)
    new = next(r["eval_set"] for r in rows if r["role"] == "new")
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in order(rows):
        steps = sorted({k[2] for k in points if k[0] == run})
        seeds = sorted({k[1] for k in points if k[0] == run})
        means = {}
        for axis, column in ((axes[0], new), (axes[1], "prior avg")):
            values = [[100 * points[run, s, step][column] for s in seeds] for step in steps]
            means[column] = [statistics.fmean(v) for v in values]
            line, = axis.plot(steps, means[column], marker="o", markersize=3,
                              label=f"{run} (mean of {len(seeds)} seeds)")
            axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                              alpha=0.2, linewidth=0)
        axes[2].plot(means[new], means["prior avg"], marker="o", markersize=3, color=line.get_color(), label=run)
    for axis, title, xlabel in ((axes[0], f"new skill ({new})", "optimizer step"),
                                (axes[1], "prior skills (average)", "optimizer step"),
                                (axes[2], "trade-off (a point per evaluated step)", f"new skill ({new}) accuracy (%)")):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("accuracy (%)" if axis is not axes[2] else "prior average (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(loc="upper right")
    figure.suptitle("Learning a new skill from demonstrations: SFT vs SDFT from the same pretrained model "
                    "(bands: min–max over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="Folder holding one folder per run (finetune.py --out).")
    parser.add_argument("--out", required=True, help="Folder for results.md and accuracy_vs_step.png.")
    parser.add_argument("--teacher-check", help="The harness's results for the pretrained model on the teacher's "
                        "prompts (run_study.sh: teacher_check.jsonl), quoted under the table.")
    args = parser.parse_args(argv)
    rows = load(Path(args.runs))
    out = Path(args.out)
    plot(rows, out / "accuracy_vs_step.png")
    text = table(rows)
    if args.teacher_check:
        for r in read_results(args.teacher_check):
            text += (f"\n\nTeacher check: with its demonstration in the prompt, the pretrained model answers "
                     f"{100 * r['score']:.1f} % of the {r['n']} held-out {r['eval_set']} prompts.")
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"plot: {out / 'accuracy_vs_step.png'}")


if __name__ == "__main__":
    main()
