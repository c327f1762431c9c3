"""Run under `deepspeed --num_gpus 2` by tests/test_resume.py; each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/resume.py --out DIR

Run A trains 4 optimizer steps straight, saving at step 2. Run B, a new trainer, resumes from that checkpoint
and trains steps 3-4. A generated batch serves 3 steps, so the checkpoint holds a rollout not yet trained on,
and the EMA teacher (made from the student's checkpoint) carries state of its own.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import gathered_weights, max_difference, script_out  # noqa: E402

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def trainer(output_dir, **settings):
    args = SDFTConfig(output_dir=str(output_dir), per_device_train_batch_size=2, steps_per_generation=3, max_steps=4,
                      save_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1,
                      max_completion_length=8, teacher_mode="ema", teacher_update_rate=0.1, logging_steps=1, seed=0,
                      num_iterations=1, distillation_is_clip=1.5, **settings)
    return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                       train_dataset=str(DEMO_TRAIN_CHAT))


straight = trainer(out / "a")
straight.train()
student_a, teacher_a = gathered_weights(straight.student), gathered_weights(straight.teacher)

resumed = trainer(out / "b", resume_from_checkpoint=str(out / "a" / "checkpoints" / "step-2"))
# as built, before train() loads the checkpoint
student_start, teacher_start = gathered_weights(resumed.student), gathered_weights(resumed.teacher)
resumed.train()
rank = resumed.rank
saved = torch.load(out / "a" / "checkpoints" / "step-2" / f"sdft_state-rank{rank}.pt", weights_only=False)
report = {"steps": resumed.step, "saved_rollouts_left": len(saved["queue"]),
          "saved_rollout_step": saved["queue"][0]["rollout_step"],
          "student_difference": max_difference(student_a, gathered_weights(resumed.student)),
          "student_moved": max_difference(student_a, student_start),
          "teacher_difference": max_difference(teacher_a, gathered_weights(resumed.teacher)),
          "teacher_moved": max_difference(teacher_a, teacher_start),
          "latest": (out / "a" / "checkpoints" / "latest").read_text().strip()}
(out / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))
