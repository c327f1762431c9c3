"""Run by tests/test_generation_mechanism.py under `deepspeed --num_gpus N`: what ZeRO-3 does while sdft_ds
generates and trains, counted at DeepSpeed's own entry points (parameter fetches by the module hooks, trace
invalidations) and at torch.distributed's all-gather. Each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/generation_mechanism.py --out DIR
"""

import collections
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir
from sdft_ds.data import left_pad
from sdft_ds.rollout import HFGenerateRollout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import script_out  # noqa: E402

out = script_out()

counts: collections.Counter = collections.Counter()


def count_calls(owner, name: str) -> None:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)


count_calls(PartitionedParameterCoordinator, "fetch_sub_module")  # what ZeRO-3's forward hooks call per module
count_calls(PartitionedParameterCoordinator, "_invalidate_trace")
count_calls(dist, "all_gather_into_tensor")  # every ZeRO-3 parameter gather on more than one rank


def counted(fn) -> dict:
    counts.clear()
    fn()
    return dict(counts)


tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
# Sampling at a high temperature from a tiny model: completions end at EOS at many different positions.
config = SDFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=4, max_steps=8,
                    max_completion_length=24, temperature=1.5, seed=0)
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), ref_model=str(model_dir("tiny-qwen2-teacher")),
                      args=config, processing_class=tokenizer, train_dataset=str(DEMO_TRAIN))
report: dict = {"rollout": trainer.rollout.name, "world_size": trainer.world_size,
                "partitioned_params": sum(1 for p in trainer.student.module.parameters()
                                          if hasattr(p, "ds_id") and not p.ds_persist)}
rows = [trainer.prompts.prompt_ids[i] for i in range(4)]
ids, mask = left_pad(rows, tokenizer.pad_token_id)
request = RolloutRequest(ids, mask)
never = [tokenizer.vocab_size + 1]  # an id no model emits: every call decodes exactly max_new_tokens
for engine_name, engine in (("student", trainer.student), ("teacher", trainer.teacher)):
    for gather_once in (True, False):
        rollout = HFGenerateRollout(engine, never, tokenizer.pad_token_id, gather_once, trainer.world_size)
        for new_tokens in (4, 16):
            report[f"{engine_name}_{rollout.name}_{new_tokens}"] = counted(
                lambda: rollout.generate(request, SamplingConfig(max_new_tokens=new_tokens), greedy=True))

# An exception inside the rollout: hooks back in their places, parameters re-partitioned, F.linear restored.
hooks_before = [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in trainer.student.module.modules()]
linear_before = torch.nn.functional.linear
try:
    with engines.whole_model(trainer.student):
        raise KeyboardInterrupt
except KeyboardInterrupt:
    pass
report["restored_after_exception"] = (
    hooks_before == [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in trainer.student.module.modules()]
    and torch.nn.functional.linear is linear_before
    and all(p.data.numel() == 0 for p in trainer.student.module.parameters() if hasattr(p, "ds_id") and not p.ds_persist))

in_generation: list[dict] = []
generate = trainer.rollout.generate


def generate_counted(*args, **kwargs):
    before = collections.Counter(counts)
    try:
        return generate(*args, **kwargs)
    finally:
        in_generation.append(dict(collections.Counter(counts) - before))


trainer.rollout.generate = generate_counted
steps, completion_tokens = [], []
for _ in range(config.max_steps):
    trainer.queue.clear()  # a fresh rollout every step
    result = {}
    steps.append(counted(lambda: result.update(trainer.train_step())))
    completion_tokens.append(result["completion_tokens"])
report.update(steps=steps, in_generation=in_generation, completion_tokens=completion_tokens)
coordinator = trainer.student.optimizer.parameter_offload.get_param_coordinator()
report["trace_complete"] = coordinator.is_complete_trace()
report["released"] = all(p.data.numel() == 0 for p in trainer.student.module.parameters()
                         if hasattr(p, "ds_id") and not p.ds_persist)
(out / f"report-rank{trainer.rank}.json").write_text(json.dumps(report, indent=1))
