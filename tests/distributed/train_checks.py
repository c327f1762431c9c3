"""Run under `deepspeed --num_gpus 2` by tests/test_integration.py; each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/train_checks.py --out DIR --overrides '{"max_steps": 30}'

Trains the tiny student against the tiny teacher and records what the test asserts: ZeRO-3 partitioning,
held-out forward KL before/after, whether student and teacher weights moved; the test loads the saved model.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_HELDOUT_CHAT, DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--overrides", default="{}")
parser.add_argument("--local_rank", type=int, default=-1)
cli = parser.parse_args()
out = Path(cli.out)

tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
settings = dict(output_dir=str(out / "model"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=30, learning_rate=3e-3, lr_scheduler_type="constant", max_prompt_length=64,
                max_teacher_prompt_length=128, max_completion_length=16, logging_steps=10, seed=0)
settings.update(json.loads(cli.overrides))
ref_model = settings.pop("ref_model", str(model_dir("tiny-qwen2-teacher")))
trainer = SDFTTrainer(model=str(model_dir(settings.pop("model", "tiny-qwen2-student"))), ref_model=ref_model,
                      args=SDFTConfig(**settings), processing_class=tokenizer, train_dataset=str(DEMO_TRAIN_CHAT))
rank = trainer.rank


def weights(engine):
    return {k: v.float().clone() for k, v in engines.consolidated_state_dict(engine).items()}


local, total = engines.numel(trainer.student)
student_before = weights(trainer.student)
teacher_before = weights(trainer.teacher)
kl_before = trainer.heldout_divergence(str(DEMO_HELDOUT_CHAT))
metrics = trainer.train()
kl_after = trainer.heldout_divergence(str(DEMO_HELDOUT_CHAT))
student_after = weights(trainer.student)
teacher_after = weights(trainer.teacher)
trainer.save_model()

report = {"rank": rank, "world_size": trainer.world_size, "local_params": local, "total_params": total,
          "kl_before": kl_before, "kl_after": kl_after, "metrics": metrics,
          "loss_finite": all(math.isfinite(v) for v in metrics.values())}
if rank == 0:
    report["student_max_change"] = max((student_after[k] - v).abs().max().item() for k, v in student_before.items())
    report["teacher_max_change"] = max((teacher_after[k] - v).abs().max().item() for k, v in teacher_before.items())
    torch.save(student_after, out / "student_after.pt")
(out / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))
