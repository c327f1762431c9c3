"""Run under `deepspeed --num_gpus 2` by tests/test_teacher_modes.py: one generated batch serves 4 optimizer steps
(steps_per_generation = 2, num_iterations = 2) at temperature 0.7 with no ratio clip; rank 0 saves every rank's
trained micro-batches with the importance ratio applied, and the student's weights before and after each step.

    deepspeed --num_gpus 2 tests/distributed/reuse_ratio.py --out DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import script_out  # noqa: E402

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
args = SDFTConfig(output_dir=str(out), per_device_train_batch_size=2, steps_per_generation=2, num_iterations=2,
                  max_steps=4, learning_rate=2e-3, lr_scheduler_type="constant", temperature=0.7,
                  distillation_is_clip=None, max_completion_length=8, seed=0)
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), ref_model=str(model_dir("tiny-qwen2-teacher")),
                      args=args, processing_class=tokenizer, train_dataset=str(DEMO_TRAIN_CHAT))

trained = []  # every micro-batch as the student trained on it, with the ratio the loss applied
divergence = trainer._divergence


def recording_divergence(batch, teacher_hidden, weights, stale=False):
    out = divergence(batch, teacher_hidden, weights, stale)
    trained.append({"steps_done": trainer.step, "rollout_step": batch.rollout_step,
                    "ratio": None if out.ratio is None else out.ratio.detach().cpu(),
                    **{k: getattr(batch, k).cpu() for k in ("input_ids", "attention_mask", "completion_ids",
                                                            "completion_mask")},
                    "start": batch.start})
    return out


trainer._divergence = recording_divergence
weights = [engines.consolidated_state_dict(trainer.student)]  # the rollout of step 1 samples from these
for _ in range(args.max_steps):
    trainer.train_step()
    weights.append(engines.consolidated_state_dict(trainer.student))
gathered = [None] * trainer.world_size
dist.all_gather_object(gathered, trained)
if trainer.rank == 0:
    torch.save({"trained": gathered, "weights": weights, "temperature": args.temperature}, out / "reuse.pt")
