"""Run under `deepspeed --num_gpus 2` by tests/test_lora.py: one LoRA SDFT optimizer step on fixed completions
(2 per rank), the teacher the student's own engine (adapter disabled, or the EMA adapter); rank 0 saves every
rank's inputs and the gathered weights (base, student adapter, teacher adapter) before and after.

    deepspeed --num_gpus 2 tests/distributed/lora_step.py --out DIR --teacher ema --deepspeed zero3_offload.json
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_HELDOUT, TOKENIZER_DIR, model_dir
from sdft_ds.config import DS_CONFIG_DIR
from sdft_ds.data import load_prompt_dataset, tokenize_prompts, with_teacher_prompts

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--teacher", default="frozen", help="teacher_mode")
parser.add_argument("--deepspeed", default="zero3_offload.json", help="a file in ds_configs/")
parser.add_argument("--local_rank", type=int, default=-1)
cli = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
# lr = 1 and eps = 1: Adam's first update is g / (|g| + 1), nearly linear in the gradient (see one_step.py).
# init_lora_weights=False: B starts non-zero, so both A and B get gradients and the student differs from the base.
config = SDFTConfig(output_dir=cli.out, per_device_train_batch_size=2, max_steps=1, learning_rate=1.0,
                    adam_epsilon=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", teacher_mode=cli.teacher,
                    teacher_update_rate=0.25, divergence_token_chunk=5, divergence_vocab_chunk=100,
                    max_completion_length=16, seed=0, deepspeed=str(DS_CONFIG_DIR / cli.deepspeed))
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM")
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=config, processing_class=tokenizer,
                      train_dataset=str(DEMO_HELDOUT), peft_config=lora)
rank = trainer.rank

rows = with_teacher_prompts(load_prompt_dataset(str(DEMO_HELDOUT)), config.teacher_prompt_template)
mine = rows.select(range(2 * rank, 2 * rank + 2))
prompts = tokenize_prompts(mine, tokenizer, config.max_prompt_length, config.max_teacher_prompt_length)
answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in mine["answer"]]
width = max(map(len, answers)) + 2
completion_ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
completion_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
batch = trainer.micro_batch(prompts.prompt_ids, prompts.teacher_prompt_ids, completion_ids, completion_mask,
                            torch.zeros(2, dtype=torch.bool))
before = engines.consolidated_state_dict(trainer.student)
trainer.queue = trainer.generate_round()  # a real rollout first (with the adapter): training after it is unaffected
trainer.queue = [batch]
trainer.train_step()
after = engines.consolidated_state_dict(trainer.student)
fields = ("input_ids", "attention_mask", "start", "teacher_input_ids", "teacher_attention_mask", "teacher_start",
          "completion_ids", "completion_mask", "loss_mask")
inputs = {k: torch.as_tensor(getattr(batch, k)).cpu() for k in fields}
gathered = [None] * trainer.world_size
dist.all_gather_object(gathered, inputs)
trained = [n for n, p in engines.language_model(trainer.student).named_parameters() if p.requires_grad]
if rank == 0:
    torch.save({"batches": gathered, "before": before, "after": after,
                "trained": trained,
                "syncs": trainer.teacher_syncs}, Path(cli.out) / "step.pt")
