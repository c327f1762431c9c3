"""Run under `deepspeed --num_gpus 2` by tests/test_teacher_modes.py: several short trainers in one process
(EMA at two rates, live, generation from the teacher, rollout reuse); each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/teacher_modes.py --out DIR
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import gathered_weights, max_difference, script_out  # noqa: E402

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
student = str(model_dir("tiny-qwen2-student"))
rank, _ = engines.init_distributed()
report: dict = {}

# A teacher with the student's architecture but other weights, so that EMA has something to average.
perturbed = out / "perturbed-student"
if rank == 0:
    unset_hf_deepspeed_config()
    model = AutoModelForCausalLM.from_pretrained(student)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(perturbed)
engines.barrier()


def trainer(ref_model=None, dataset=str(DEMO_TRAIN), **settings):
    base = dict(output_dir=str(out / "run"), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2,
                lr_scheduler_type="constant", max_completion_length=8, logging_steps=1, seed=0)
    return SDFTTrainer(model=student, ref_model=ref_model, args=SDFTConfig(**{**base, **settings}),
                       processing_class=tokenizer, train_dataset=dataset)


# EMA: θ_T ← (1 − r)·θ_T + r·θ_S after the step, compared on gathered weights.
for rate in (0.01, 1.0):
    ema = trainer(ref_model=str(perturbed), teacher_mode="ema", teacher_update_rate=rate)
    teacher_before = gathered_weights(ema.teacher)
    metrics = ema.train()
    student_after, teacher_after = gathered_weights(ema.student), gathered_weights(ema.teacher)
    if rank == 0:
        report[f"ema_{rate}_max_error"] = max(
            (teacher_after[k] - ((1 - rate) * teacher_before[k] + rate * student_after[k])).abs().max().item()
            for k in teacher_before)
        report[f"ema_{rate}_teacher_moved"] = max_difference(teacher_after, teacher_before)
    report[f"ema_{rate}_syncs"] = metrics["teacher_syncs"]

# EMA of a bf16 teacher runs in fp32 copies of its partitions: after two steps the teacher is the bf16 rounding of
# the fp32 average, which an average kept in bf16 (r·(θ_S − θ_T) mostly below its resolution) misses.
rate = 0.01
bf16 = trainer(teacher_mode="ema", teacher_update_rate=rate, bf16=True, max_steps=2, learning_rate=1e-3)
teacher_0 = gathered_weights(bf16.teacher)
student_after = []
for step in (1, 2):
    bf16.total_steps = step
    bf16.train()
    student_after.append({k: v.float() for k, v in engines.consolidated_state_dict(bf16.student).items()})
teacher_2 = {k: v for k, v in engines.consolidated_state_dict(bf16.teacher).items()}
if rank == 0:
    fp32_average = {k: v.float().lerp(student_after[0][k], rate).lerp(student_after[1][k], rate)
                    for k, v in teacher_0.items()}
    bf16_average = {k: v.bfloat16().lerp(student_after[0][k].bfloat16(), rate).lerp(student_after[1][k].bfloat16(),
                                                                                    rate) for k, v in teacher_0.items()}
    report["ema_bf16_dtype"] = str(teacher_2["model.norm.weight"].dtype)
    report["ema_bf16_mismatches"] = sum(int((teacher_2[k] != v.bfloat16()).sum()) for k, v in fp32_average.items())
    report["ema_bf16_naive_differs"] = sum(int((teacher_2[k] != v).sum()) for k, v in bf16_average.items())

# Live: the teacher is the current student. After training on demonstrations the student has changed, yet
# where teacher_prompt == prompt the divergence is exactly 0 (a copy taken at the start would differ).
same = Dataset.from_dict({"prompt": ["Reverse the word 'cherry'."] * 4,
                          "teacher_prompt": ["Reverse the word 'cherry'."] * 4, "answer": ["yrrehc"] * 4})
live = trainer(teacher_mode="live", max_steps=2, learning_rate=5e-2)
student_before = gathered_weights(live.student)
live.train()
student_after = gathered_weights(live.student)
report["live_teacher_is_student"] = live.teacher is live.student
report["live_heldout_divergence"] = live.heldout_divergence(same)
if rank == 0:
    report["live_student_moved"] = max_difference(student_after, student_before)

# generate_from_teacher: the rollout is conditioned on teacher prompts; the student trains on its own prompts.
from_teacher = trainer(ref_model=str(model_dir("tiny-qwen2-teacher")), generate_from_teacher=True)
seen = []
generate = from_teacher.rollout.generate
from_teacher.rollout.generate = lambda request, sampling: seen.append(request.prompt_ids.clone()) or generate(
    request, sampling)
rows = from_teacher.sampler.next_round()
from_teacher.sampler.rounds_done -= 1  # replay the same round through the trainer
batches = from_teacher.generate_round()
pad = tokenizer.pad_token_id


def unpadded(ids):
    return [[t for t in row if t != pad] for row in ids.tolist()]


report["rollout_engine_is_teacher"] = from_teacher.rollout.engine is from_teacher.teacher
report["generation_saw_teacher_prompts"] = unpadded(seen[0]) == [from_teacher.prompts.teacher_prompt_ids[i]
                                                                 for i in rows]
report["student_batch_has_student_prompts"] = unpadded(batches[0].input_ids[:, :batches[0].start]) == [
    from_teacher.prompts.prompt_ids[i] for i in rows]
report["teacher_batch_has_teacher_prompts"] = unpadded(
    batches[0].teacher_input_ids[:, :batches[0].teacher_start]) == [from_teacher.prompts.teacher_prompt_ids[i]
                                                                    for i in rows]

# Rollout reuse: two passes over each generated batch. The first pass is on-policy (no ratio); the second
# sees a changed student, so the clipped ratio applies.
reuse = trainer(ref_model=str(model_dir("tiny-qwen2-teacher")), num_iterations=2, max_steps=2,
                learning_rate=5e-2, distillation_is_clip=1.02)
step_metrics = []
for _ in range(2):  # one train() call per step, to read each step's metrics
    reuse.total_steps = reuse.step + 1
    step_metrics.append(reuse.train())
report["reuse_step1_has_ratio"] = "is_ratio_mean" in step_metrics[0]
report["reuse_step2_ratio"] = {k: v for k, v in step_metrics[1].items() if k.startswith("is_ratio")}
report["reuse_queue_consumed"] = len(reuse.queue) == 0

(out / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))
