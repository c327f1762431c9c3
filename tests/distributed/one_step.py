"""Run under `deepspeed --num_gpus 2` by tests/test_zero3_step.py: a rollout, then one SDFT optimizer step on
fixed completions (`--accumulation` micro-batches of 2 per rank); rank 0 saves every rank's inputs and the
updated (gathered) student weights.

    deepspeed --num_gpus 2 tests/distributed/one_step.py --out DIR --student tiny-llama --alpha 0.5 \
        --deepspeed zero2_offload.json --accumulation 2 --normalization token
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_HELDOUT, TOKENIZER_DIR, model_dir
from sdft_ds.config import DS_CONFIG_DIR
from sdft_ds.data import load_prompt_dataset, tokenize_prompts, with_teacher_prompts

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--student", default="tiny-qwen2-student")
parser.add_argument("--alpha", type=float, default=0.0)
parser.add_argument("--impl", default="chunked")
parser.add_argument("--deepspeed", default="zero3_offload.json", help="a file in ds_configs/")
parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
parser.add_argument("--normalization", default="sequence", help="loss_normalization")
parser.add_argument("--local_rank", type=int, default=-1)
cli = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
# lr = 1 and eps = 1 make Adam's first update g / (|g| + 1): nearly linear in the gradient, so a wrong
# gradient scale shows up (with the usual eps the first step is ~lr·sign(g) and hides it).
config = SDFTConfig(output_dir=cli.out, per_device_train_batch_size=2, max_steps=1, learning_rate=1.0,
                    adam_epsilon=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", distillation_alpha=cli.alpha,
                    divergence_impl=cli.impl, divergence_token_chunk=5, divergence_vocab_chunk=100,
                    num_loss_tokens_to_skip=1, max_completion_length=16, seed=0,
                    gradient_accumulation_steps=cli.accumulation, loss_normalization=cli.normalization,
                    deepspeed=str(DS_CONFIG_DIR / cli.deepspeed))
trainer = SDFTTrainer(model=str(model_dir(cli.student)), ref_model=str(model_dir("tiny-qwen2-teacher")),
                      args=config, processing_class=tokenizer, train_dataset=str(DEMO_HELDOUT))
rank = trainer.rank

rows = with_teacher_prompts(load_prompt_dataset(str(DEMO_HELDOUT)), config.teacher_prompt_template)
size = 2 * cli.accumulation
mine = rows.select(range(size * rank, size * rank + size))
prompts = tokenize_prompts(mine, tokenizer, config.max_prompt_length, config.max_teacher_prompt_length)
answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in mine["answer"]]
batches = []
for i in range(0, size, 2):
    pair = answers[i:i + 2]
    width = max(map(len, pair)) + 2  # trailing padding after EOS must stay out of the loss
    completion_ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in pair])
    completion_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in pair])
    batches.append(trainer.micro_batch(prompts.prompt_ids[i:i + 2], prompts.teacher_prompt_ids[i:i + 2],
                                        completion_ids, completion_mask, torch.zeros(2, dtype=torch.bool)))
before = engines.consolidated_state_dict(trainer.student)
trainer.queue = trainer.generate_round()  # a real rollout first: training after it must be unaffected
trainer.queue = list(batches)  # the step trains on these fixed completions instead of the sampled ones
trainer.train_step()
assert not trainer.queue and trainer.step == 1  # one optimizer step took all the micro-batches
after = engines.consolidated_state_dict(trainer.student)
fields = ("input_ids", "attention_mask", "start", "teacher_input_ids", "teacher_attention_mask", "teacher_start",
          "completion_ids", "completion_mask", "loss_mask")
inputs = [{k: torch.as_tensor(getattr(batch, k)).cpu() for k in fields} for batch in batches]
gathered = [None] * trainer.world_size
dist.all_gather_object(gathered, inputs)
if rank == 0:
    torch.save({"batches": gathered, "before": before, "after": after}, Path(cli.out) / "step.pt")
