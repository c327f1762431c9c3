"""The seed document's Quick Start, unchanged but for two local tiny checkpoints in place of the hub models
(Qwen2-0.5B-Instruct student, Qwen2-1.5B-Instruct teacher: same tokenizer, different sizes).

    python launch/quickstart.py          # one process, no launcher

One rank only: its dataset holds one prompt and every rank needs its own (under `deepspeed --num_gpus 2` the
trainer stops with "The dataset has 1 prompts, fewer than one generation round needs").
"""

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import model_dir

student_model = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-student"))
teacher_model = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-teacher"))
tokenizer = AutoTokenizer.from_pretrained(model_dir("tiny-qwen2-student"))
tokenizer.pad_token = tokenizer.eos_token

train_dataset = Dataset.from_dict(
    {
        "prompt": ["Write a haiku about the ocean."],
        "teacher_prompt": ["Write a haiku about the ocean."],
    }
)

training_args = SDFTConfig(output_dir="sdft-model", per_device_train_batch_size=1)
trainer = SDFTTrainer(
    model=student_model,
    ref_model=teacher_model,
    args=training_args,
    processing_class=tokenizer,
    train_dataset=train_dataset,
)
trainer.train()
