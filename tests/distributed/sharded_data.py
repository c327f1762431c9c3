"""Run under `deepspeed --num_gpus 2` by tests/test_faults.py: each rank is given its own shard of the prompts
(16 rows on rank 0, 24 on rank 1), as a user who pre-shards data might. The trainer must refuse on both ranks
before any engine, not count different steps and hang in a collective.

    deepspeed --num_gpus 2 tests/distributed/sharded_data.py --out DIR
"""

import sys
from pathlib import Path

from datasets import load_dataset
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import script_out  # noqa: E402

out = script_out()
rank, _ = engines.init_distributed()
rows = load_dataset("json", data_files=str(DEMO_TRAIN), split="train").select(range(16 if rank == 0 else 24))
SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=SDFTConfig(output_dir=str(out / "run"), max_steps=2),
            processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=rows)
