"""Teach the pretrained model the new skill (tasks.NEW_SKILL) with SDFT or SFT through sdft_ds, scoring every eval set
(new skill, prior skills, in-context learning) before training and every --eval-every optimizer steps.

    python examples/continual/finetune.py --base outputs/continual/base --data outputs/continual/data \
        --method sdft --seed 0 --out outputs/continual/runs/sdft-ema-0

One process, one rank, ZeRO-0 (the model has a few hundred thousand parameters). SDFT and SFT differ in `method`
alone; everything else (data order, optimizer, schedule, steps, batch) is the same. The student is scored in the
process with the harness's own scorer (sdft_ds.evaluate.evaluate_set), so accuracy-vs-step needs no checkpoint per
point; the final model is saved for `python -m sdft_ds.evaluate`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def score(model, tokenizer, sets, **labels) -> list[dict]:
    """One harness result row per eval set for the student as it is now, tagged with `labels`."""
    from sdft_ds.evaluate import evaluate_set

    model.eval()
    rows = []
    with torch.no_grad():
        for spec, data in sets:
            rows.append({**labels, "eval_set": spec.name, "role": spec.role, "metric": spec.metric,
                         **evaluate_set(model, tokenizer, spec, data, batch_size=64)})
    model.train()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="The pretrained model (pretrain.py --out).")
    parser.add_argument("--data", required=True, help="The data folder (make_data.py --out).")
    parser.add_argument("--method", choices=("sdft", "sft"), required=True)
    parser.add_argument("--seed", type=int, default=0, help="Training seed: data order and sampling.")
    parser.add_argument("--out", required=True, help="Run folder: results.jsonl, final model.")
    parser.add_argument("--steps", type=int, default=200, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per optimizer step.")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--teacher-mode", choices=("ema", "frozen"), default="ema",
                        help="SDFT's teacher: the EMA of the student (the paper's) or the pretrained model.")
    parser.add_argument("--ema-rate", type=float, default=0.01, help="SDFT's EMA teacher rate (paper: 0.01).")
    parser.add_argument("--eval-every", type=int, default=20)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdft_ds import SDFTConfig, SDFTTrainer, engines
    from sdft_ds.evaluate import append_results, load_rows, read_eval_sets

    out = Path(args.out)
    sets = [(spec, load_rows(spec)) for spec in read_eval_sets(Path(args.data) / "eval_sets.json")]
    config = SDFTConfig(
        output_dir=str(out), method=args.method, deepspeed="zero0.json", seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_ratio=0.1, weight_decay=0.0,
        teacher_mode=args.teacher_mode, teacher_update_rate=args.ema_rate,
        distillation_alpha=0.0,  # forward KL(teacher || student), the paper's
        max_prompt_length=48, max_teacher_prompt_length=96, max_completion_length=12, temperature=1.0,
        logging_steps=args.eval_every, save_steps=0, report_to="none")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    trainer = SDFTTrainer(AutoModelForCausalLM.from_pretrained(args.base), args=config, processing_class=tokenizer,
                          train_dataset=str(Path(args.data) / "train.jsonl"))
    student = engines.language_model(trainer.student)
    run = "SFT" if args.method == "sft" else f"SDFT, {args.teacher_mode} teacher"
    labels = {"checkpoint": args.base, "run": run, "method": args.method, "seed": args.seed}
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    append_results(score(student, tokenizer, sets, stage=f"{run} step 0", step=0, **labels), results)
    started = time.perf_counter()
    while trainer.step < trainer.total_steps:
        trainer.train_step()
        if trainer.step % args.eval_every == 0 or trainer.step == trainer.total_steps:
            scores = score(student, tokenizer, sets, stage=f"{run} step {trainer.step}", step=trainer.step,
                           **labels)
            append_results(scores, results)
            shown = ", ".join(f"{r['eval_set']} {r['score']:.2f}" for r in scores)
            print(f"{run}, seed {args.seed}, step {trainer.step} ({time.perf_counter() - started:.0f} s): "
                  f"{shown}", flush=True)
    trainer.save_model(str(out / "final"))


if __name__ == "__main__":
    main()
