"""Generation throughput of each rollout path against plain `generate` on an unpartitioned copy of the same model,
in the same processes, on the same prompts, with the mechanism counted (ZeRO-3 hook fetches, all-gathers).

    deepspeed --num_gpus 1 benchmarks/rollout.py --prompts 16       # CPU, 1 rank: the 6 M Qwen2 of benchmarks/step.py
    deepspeed --num_gpus 2 benchmarks/rollout.py --prompts 8        # CPU, 2 ZeRO-3 ranks: the same global batch
    deepspeed --num_gpus 1 benchmarks/rollout.py --model llama-1b   # GPU: ~1.1B Llama from a config

Every path decodes exactly --new_tokens tokens per prompt (no EOS can stop it), so tokens/s is decoding speed at a
known length; greedy tokens of each path are compared with plain generate's. Paths run interleaved, best of
--repeats; a warm-up call per path first (compilation included there, reported separately).
"""

import argparse
import collections
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir
from sdft_ds.config import DS_CONFIG_DIR
from sdft_ds.data import left_pad
from sdft_ds.rollout import HFGenerateRollout, HybridEngineGenerate, generation_config, hybrid_engine_blocker

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="qwen2-6m", choices=["qwen2-6m", "tiny-llama", "llama-1b"])
parser.add_argument("--prompts", type=int, default=8)
parser.add_argument("--new_tokens", type=int, default=64)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
cli = parser.parse_args()

counts: collections.Counter = collections.Counter()
for owner, name in ((PartitionedParameterCoordinator, "fetch_sub_module"), (dist, "all_gather_into_tensor")):
    def counted(*a, _original=getattr(owner, name), _name=name, **k):
        counts[_name] += 1
        return _original(*a, **k)
    setattr(owner, name, counted)
  # before DeepSpeed's communication backend keeps its own references

tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
if cli.model == "tiny-llama":
    config = AutoConfig.from_pretrained(model_dir("tiny-llama"))
elif cli.model == "qwen2-6m":  # the `small` model of benchmarks/step.py
    config = AutoConfig.for_model("qwen2", vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                                  intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, max_position_embeddings=1024)
else:
    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                  max_position_embeddings=2048)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=dtype)
plain = AutoModelForCausalLM.from_config(config, dtype=dtype)  # the unpartitioned baseline, same weights
plain.load_state_dict(model.state_dict())
plain.eval()
ds_config = "zero3_offload.json"
args = SDFTConfig(output_dir="/tmp/sdft-rollout-bench", max_steps=1, bf16=cuda, teacher_mode="live",
                  max_completion_length=cli.new_tokens, deepspeed=str(DS_CONFIG_DIR / ds_config))
trainer = SDFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=str(DEMO_TRAIN_CHAT))
engine, pad, device = trainer.student, tokenizer.pad_token_id, engines.device()
plain.to(device)
ids, mask = left_pad([trainer.prompts.prompt_ids[i] for i in range(cli.prompts)], pad)
request = RolloutRequest(ids.to(device), mask.to(device))
sampling = SamplingConfig(max_new_tokens=cli.new_tokens)
never = [config.vocab_size]  # an end-of-sequence id no model can emit: every path decodes new_tokens


class PlainGenerate:
    """HF generate on the unpartitioned copy, with torch's own F.linear (zero.Init replaced it process-wide)."""

    name = "plain"

    def generate(self, request, sampling, greedy=True):
        with torch.no_grad(), engines.torch_linear():
            return plain.generate(input_ids=request.prompt_ids, attention_mask=request.prompt_attention_mask,
                                  generation_config=generation_config(sampling, never, pad, greedy))


paths = {"plain": PlainGenerate(),
         "gather_once": HFGenerateRollout(engine, never, pad, True, trainer.world_size),
         "gather_once+compiled": HFGenerateRollout(engine, never, pad, True, trainer.world_size, compiled=True),
         "per_layer": HFGenerateRollout(engine, never, pad, False, trainer.world_size)}
blocker = engines.hybrid_engine_incompatibility() or hybrid_engine_blocker(config, True, cuda)
if blocker is None:
    paths["hybrid_engine"] = HybridEngineGenerate(engine, tokenizer, never, pad)


def timed(rollout):
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()  # every rank starts the path together
    counts.clear()
    start = time.perf_counter()
    output = rollout.generate(request, sampling, greedy=True)
    output = getattr(output, "input_ids", output)  # a RolloutBatch, or plain generate's tensor
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, output, dict(counts)


warmup = {name: timed(rollout)[0] for name, rollout in paths.items()}
best, outputs, mechanism = {}, {}, {}
for _ in range(cli.repeats):
    for name, rollout in paths.items():
        seconds, outputs[name], mechanism[name] = timed(rollout)
        best[name] = min(best.get(name, float("inf")), seconds)

if trainer.rank != 0:
    sys.exit(0)
tokens = cli.prompts * cli.new_tokens
device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
print(f"# rollout throughput: {cli.model} ({sum(p.numel() for p in plain.parameters()):,} parameters), "
      f"{cli.prompts} prompts x {cli.new_tokens} new tokens per rank, greedy, ZeRO-3 ({ds_config}), "
      f"{trainer.world_size} rank(s), {device_name}")
if blocker:
    print(f"# hybrid engine not run: {blocker}")
print(f"| path | best of {cli.repeats} (s) | tokens/s per rank | vs plain generate | first call (s) | "
      "hook fetches | all-gathers | greedy tokens = plain |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
results = {}
for name in paths:
    same = torch.equal(outputs[name][:, -cli.new_tokens:].cpu(), outputs["plain"][:, -cli.new_tokens:].cpu())
    rate = tokens / best[name]
    results[name] = dict(seconds=best[name], tokens_per_second=rate, first_call=warmup[name], same_tokens=same,
                         **mechanism[name])
    print(f"| {name} | {best[name]:.3f} | {rate:.1f} | {rate * best['plain'] / tokens:.2f}x | {warmup[name]:.2f} | "
          f"{mechanism[name].get('fetch_sub_module', 0)} | {mechanism[name].get('all_gather_into_tensor', 0)} | {same} |")
print(json.dumps(results))
