"""Run by tests/test_rollout_paths.py under `deepspeed --num_gpus 1`: compiled decoding (static KV cache +
torch.compile) against eager decoding on the same ZeRO-3 engine, greedy, with prompt batches of different widths
and rows that stop at EOS at different steps; then training steps that sample through the compiled path.

    deepspeed --num_gpus 1 tests/distributed/compiled_generation.py --out DIR
"""

import json
import sys
from pathlib import Path

import torch
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir
from sdft_ds.data import left_pad
from sdft_ds.rollout import HFGenerateRollout, split_completions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import script_out  # noqa: E402

out = script_out()
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), ref_model=str(model_dir("tiny-qwen2-teacher")),
                      args=SDFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=4, max_steps=3,
                                      max_completion_length=24, compile_generation=True, seed=0),
                      processing_class=tokenizer, train_dataset=str(DEMO_TRAIN_CHAT))
eager = HFGenerateRollout(trainer.student, trainer.eos_ids, tokenizer.pad_token_id, True, 1)
report: dict = {"path": trainer.rollout.name, "batches": []}
sampling = SamplingConfig(max_new_tokens=24)
prompts = sorted(trainer.prompts.prompt_ids, key=len)
for rows in (prompts[:4], prompts[-6:], prompts[-4:]):  # two prompt widths, two batch sizes
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    request = RolloutRequest(ids, mask)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = split_completions(trainer.rollout.generate(request, sampling, greedy=True), trainer.eos_ids,
                                 tokenizer.pad_token_id)
    reference = split_completions(eager.generate(request, sampling, greedy=True), trainer.eos_ids,
                                  tokenizer.pad_token_id)
    report["batches"].append({
        "equal": torch.equal(compiled.ids, reference.ids) and torch.equal(compiled.mask, reference.mask),
        "width": ids.shape[1], "lengths": reference.lengths.tolist(), "new_graphs": counters["stats"]["unique_graphs"] - graphs_before})
report["trained"] = trainer.train()["loss"]
(out / "report-rank0.json").write_text(json.dumps(report, indent=1))
