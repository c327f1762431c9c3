"""Run under `deepspeed --num_gpus 2` by tests/test_rollout_paths.py: gather-once and per-layer generation on
the same prompts and weights, for a Qwen2 and a Llama student; each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/rollout_paths.py --out DIR
"""

import json
import sys
from pathlib import Path

import torch
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir
from sdft_ds.data import left_pad
from sdft_ds.rollout import HFGenerateRollout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import script_out  # noqa: E402

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
report: dict = {}

for name in ("tiny-qwen2-student", "tiny-llama"):
    trainer = SDFTTrainer(model=str(model_dir(name)), ref_model=str(model_dir("tiny-qwen2-teacher")),
                          args=SDFTConfig(output_dir=str(out / name), max_steps=1, max_completion_length=12),
                          processing_class=tokenizer, train_dataset=str(DEMO_TRAIN))
    rank = trainer.rank
    # Ranks hold different prompts of different lengths, so they finish at different steps: synced_gpus matters.
    rows = [trainer.prompts.prompt_ids[i][: 6 + 9 * rank] for i in range(3 * rank, 3 * rank + 3)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    request = RolloutRequest(ids, mask)
    sampling = SamplingConfig(max_new_tokens=12)
    outputs = {}
    for gather_once in (True, False):
        rollout = HFGenerateRollout(trainer.student, trainer.eos_ids, tokenizer.pad_token_id, gather_once,
                                    trainer.world_size)
        outputs[rollout.name] = rollout.generate(request, sampling, greedy=True).input_ids
    report[f"{name}_paths_agree"] = torch.equal(outputs["gather_once"], outputs["per_layer"])
    report[f"{name}_generated"] = int(outputs["gather_once"].shape[1] - ids.shape[1])
    report[f"{name}_default_path"] = trainer.rollout.name
    params = list(trainer.student.module.parameters())
    report[f"{name}_released_after_generation"] = all(p.data.numel() == 0 for p in params if hasattr(p, "ds_id")
                                                      and not p.ds_persist)
    report[f"{name}_training_mode_after"] = trainer.student.module.training
    report[f"{name}_trains_after_generation"] = bool(trainer.train())

(out / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))
