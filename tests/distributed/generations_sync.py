"""Run under `deepspeed --num_gpus 2` by tests/test_teacher_modes.py: num_generations = 2 with an EMA teacher
synced every 2 steps, 5 optimizer steps; each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/generations_sync.py --out DIR

Records, per round, the sampled rows, the rollout's own output and the micro-batches it queued; per step, the
teacher's distance to its previous weights and to the EMA of them with the student.
"""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import gathered_weights, max_difference, script_out  # noqa: E402

GENERATIONS, SYNC_STEPS, STEPS, RATE = 2, 2, 5, 0.5

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
args = SDFTConfig(output_dir=str(out), per_device_train_batch_size=2, steps_per_generation=2,
                  num_generations=GENERATIONS, teacher_mode="ema", teacher_update_rate=RATE,
                  teacher_sync_steps=SYNC_STEPS, max_steps=STEPS, learning_rate=5e-2, lr_scheduler_type="constant",
                  max_completion_length=6, seed=0)
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                      train_dataset=str(DEMO_TRAIN_CHAT))

rounds = []  # per round: sampled rows, rollout sequences, queued micro-batches
next_round, generate, generate_round = trainer.sampler.next_round, trainer.rollout.generate, trainer.generate_round


def recording_next_round():
    rows = next_round()
    rounds.append({"rows": rows})
    return rows


def recording_generate(request, sampling):
    batch = generate(request, sampling)
    rounds[-1].update(rollout_ids=batch.input_ids.tolist(), rollout_mask=batch.attention_mask.tolist(),
                      rollout_start=int(batch.response_start_idx[0]))
    return batch


def recording_generate_round():
    batches = generate_round()
    rounds[-1]["batches"] = [{k: getattr(b, k).tolist() for k in ("input_ids", "attention_mask", "teacher_input_ids",
                                                                  "teacher_attention_mask", "completion_ids",
                                                                  "completion_mask")}
                             | {"start": b.start, "teacher_start": b.teacher_start} for b in batches]
    return batches


trainer.sampler.next_round, trainer.rollout.generate = recording_next_round, recording_generate
trainer.generate_round = recording_generate_round


steps = []
teacher = gathered_weights(trainer.teacher)
for _ in range(STEPS):
    trainer.train_step()
    student, new_teacher = gathered_weights(trainer.student), gathered_weights(trainer.teacher)
    ema = {k: (1 - RATE) * teacher[k] + RATE * student[k] for k in teacher}
    steps.append({"step": trainer.step, "teacher_syncs": trainer.teacher_syncs,
                  "teacher_moved": max_difference(new_teacher, teacher), "ema_error": max_difference(new_teacher, ema)})
    teacher = new_teacher

report = {"rounds": rounds, "steps": steps, "prompt_ids": [trainer.prompts.prompt_ids[i] for r in rounds
                                                          for i in r["rows"]],
          "teacher_prompt_ids": [trainer.prompts.teacher_prompt_ids[i] for r in rounds for i in r["rows"]]}
(out / f"report-rank{trainer.rank}.json").write_text(json.dumps(report))
