"""Smoke test of the continual-learning study (examples/continual): its driver script end to end at a tiny size —
data, pretraining, the pretrained model's teacher check, SFT and SDFT runs scored along the way, the report and
plot. It asserts that every piece ran and wrote what the next one reads, not anything about the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, child_env
from helpers import free_port

sys.path.insert(0, str(REPO / "examples" / "continual"))
import tasks  # noqa: E402


def test_tasks_are_exact_and_eval_sets_fixed():
    """The skills compute what they say, the eval sets do not depend on what else is generated, and no
    demonstration's prompt is in an eval set."""
    import random

    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = tasks.ends(rng)
        word = prompt.removeprefix("ends ").removesuffix("=")
        assert answer == word[0] + word[-1] and len(word) >= 3
        prompt, answer = tasks.add(rng)
        a, b = map(int, prompt.removeprefix("add ").removesuffix("=").split())
        assert answer == str(a + b)
    assert tasks.eval_rows("reverse") == tasks.eval_rows("reverse")
    held_out = {row["prompt"] for row in tasks.eval_rows(tasks.NEW_SKILL)}
    demos = tasks.training_rows(300, seed=0, exclude=held_out)
    assert not held_out & {d["prompt"] for d in demos}
    assert all(d["teacher_prompt"] == f"{d['prompt']}{d['completion']}\n{d['prompt']}" for d in demos)
    tokenizer = tasks.build_tokenizer()
    text = tasks.pretraining_document(rng)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text) - len(tasks.EOS) + 1


def test_study_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "study"
    env = child_env(MASTER_PORT=str(free_port()), DATA_ARGS="--eval-rows 8 --demonstrations 16",
                    PRETRAIN_ARGS="--steps 20 --hidden 32 --layers 1 --batch-size 16 --log-every 10",
                    FINETUNE_ARGS="--steps 4 --eval-every 2 --batch-size 4")
    done = subprocess.run(["bash", "examples/continual/run_study.sh", str(out), "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    sets = [s["name"] for s in tasks.eval_spec()]
    runs = {"sft": "SFT", "sdft-ema": "SDFT, ema teacher", "sdft-frozen": "SDFT, frozen teacher"}
    step0 = {}
    for folder, label in runs.items():
        run = out / "runs" / f"{folder}-0"
        rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
        assert sorted({(r["step"], r["eval_set"]) for r in rows}) == sorted(
            (step, s) for step in (0, 2, 4) for s in sets)
        assert all(r["run"] == label and r["seed"] == 0 and r["n"] == 8 for r in rows)
        assert (run / "final" / "config.json").is_file()
        step0[folder] = {r["eval_set"]: r["score"] for r in rows if r["step"] == 0}
    assert len({json.dumps(scores, sort_keys=True) for scores in step0.values()}) == 1  # all from one model
    report = (out / "report" / "results.md").read_text()
    assert all(f"| {label} (step 4, seeds 0) |" in report for label in runs.values())
    assert (out / "report" / "accuracy_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(line)["eval_set"] for line in (out / "teacher_check.jsonl").read_text().splitlines()] == [
        f"teacher-{tasks.NEW_SKILL}"]
