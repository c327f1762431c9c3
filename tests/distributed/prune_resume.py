"""Run under `deepspeed --num_gpus 1` by tests/test_resume.py: save_total_limit after resuming into an older history.

    deepspeed --num_gpus 1 tests/distributed/prune_resume.py --out DIR

Run A saves step-2 and step-4, then (as if it had gone on) step-10 and step-12. The user resumes from step-4 with
save_steps=1 and save_total_limit=2; rank 0 writes report-rank0.json with the folders left and the warnings.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import script_out  # noqa: E402

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
checkpoints = out / "checkpoints"


def trainer(**settings):
    args = SDFTConfig(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_completion_length=4,
                      logging_steps=100, seed=0, **settings)
    return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                       train_dataset=str(DEMO_TRAIN))


trainer(max_steps=4, save_steps=2).train()
for step in (10, 12):  # the rest of the abandoned run (copies: prune does not read them)
    shutil.copytree(checkpoints / "step-4", checkpoints / f"step-{step}")
(checkpoints / "latest").write_text("step-12")


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


warnings = Warnings()
logging.getLogger("sdft_ds").addHandler(warnings)
resumed = trainer(max_steps=7, save_steps=1, save_total_limit=2, resume_from_checkpoint=str(checkpoints / "step-4"))
resumed.train()
report = {"left": sorted(p.name for p in checkpoints.glob("step-*")),
          "latest": (checkpoints / "latest").read_text().strip(), "step": resumed.step,
          "warnings": [m for m in warnings.messages if "step-10" in m or "step-12" in m]}
(out / f"report-rank{resumed.rank}.json").write_text(json.dumps(report, indent=1))
