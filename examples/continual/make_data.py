"""Write the study's fixed data before anything trains: every eval set (tasks.eval_spec) with the harness's spec
file, and the demonstrations of the new skill (train.jsonl: prompt, teacher_prompt, completion), none of whose
prompts is in an eval set.

    python examples/continual/make_data.py --out outputs/continual/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Data folder.")
    parser.add_argument("--eval-rows", type=int, default=tasks.EVAL_ROWS, help="Rows per eval set.")
    parser.add_argument("--demonstrations", type=int, default=256, help="Rows of the new skill to learn from.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    spec = tasks.write_eval_sets(out, args.eval_rows)
    held_out = {row["prompt"] for row in tasks.eval_rows(tasks.NEW_SKILL, rows=args.eval_rows)}
    tasks.write_jsonl(tasks.training_rows(args.demonstrations, seed=0, exclude=held_out), out / "train.jsonl")
    print(f"eval sets: {spec}; demonstrations: {out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
