"""Run under `deepspeed --num_gpus 2` by tests/test_sft.py: one SFT optimizer step under ZeRO-3 on each rank's own
demo rows (prompt + reference answer); rank 0 saves every rank's micro-batches and the gathered student weights
before and after.

    deepspeed --num_gpus 2 tests/distributed/sft_step.py --out DIR --normalization token
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import load_dataset
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_HELDOUT_CHAT, TOKENIZER_DIR, model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--normalization", default="sequence", help="loss_normalization")
parser.add_argument("--local_rank", type=int, default=-1)
cli = parser.parse_args()

rows = load_dataset("json", data_files=str(DEMO_HELDOUT_CHAT), split="train")
rows = rows.select_columns(["prompt", "answer"]).rename_column("answer", "completion")
# lr = 1 and eps = 1 make Adam's first update g / (|g| + 1), nearly linear in the gradient (tests/distributed/one_step.py)
config = SDFTConfig(output_dir=cli.out, method="sft", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_steps=1, learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                    divergence_token_chunk=5, divergence_vocab_chunk=100, max_completion_length=16, seed=0,
                    loss_normalization=cli.normalization, deepspeed="zero3_offload.json")
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=config,
                      processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=rows)
before = engines.consolidated_state_dict(trainer.student)
batches = trainer.reference_round()
trainer.queue = list(batches)
trainer.train_step()
assert not trainer.queue and trainer.step == 1
after = engines.consolidated_state_dict(trainer.student)
fields = ("input_ids", "attention_mask", "start", "completion_ids", "loss_mask")
inputs = [{k: torch.as_tensor(getattr(batch, k)).cpu() for k in fields} for batch in batches]
gathered = [None] * trainer.world_size
dist.all_gather_object(gathered, inputs)
if trainer.rank == 0:
    torch.save({"batches": gathered, "before": before, "after": after}, Path(cli.out) / "step.pt")
