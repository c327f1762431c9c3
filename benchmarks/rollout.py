"""Generation throughput of each rollout path on the same prompts and weights, side by side in one command.

    deepspeed --num_gpus 2 benchmarks/rollout.py                   # CPU: the shipped tiny Llama on 2 ZeRO-3 ranks
    deepspeed --num_gpus 1 benchmarks/rollout.py --model llama-1b  # GPU: ~1.1B Llama from a config, + hybrid engine

Every path decodes exactly --new_tokens tokens per prompt (no EOS can stop it), so tokens/s is decoding speed
at a known length; the greedy tokens of each path are compared with gather-once's. Ratios are against gather-once,
run in the same processes. With one rank ZeRO-3 partitions nothing, so per-layer equals gather-once there.
"""

import argparse
import json
import os
import sys
import time

import torch
from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir
from sdft_ds.config import DS_CONFIG_DIR
from sdft_ds.data import left_pad
from sdft_ds.rollout import HFGenerateRollout, HybridEngineGenerate, hybrid_engine_blocker, split_completions

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "llama-1b"])
parser.add_argument("--prompts", type=int, default=16)
parser.add_argument("--new_tokens", type=int, default=128)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
cli = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
cuda = torch.cuda.is_available()
if cli.model == "llama-1b":
    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                  max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir("tiny-llama"))
ds_config = "zero3_offload_hybrid_engine.json" if cuda else "zero3_offload.json"
args = SDFTConfig(output_dir="/tmp/sdft-rollout-bench", max_steps=1, bf16=cuda, teacher_mode="live",
                  max_completion_length=cli.new_tokens, deepspeed=str(DS_CONFIG_DIR / ds_config))
trainer = SDFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=str(DEMO_TRAIN_CHAT))
engine, pad = trainer.student, tokenizer.pad_token_id
rows = [trainer.prompts.prompt_ids[i] for i in range(cli.prompts)]
ids, mask = left_pad(rows, pad)
device = torch.device("cuda") if cuda else torch.device("cpu")
request = RolloutRequest(ids.to(device), mask.to(device))
sampling = SamplingConfig(max_new_tokens=cli.new_tokens)
never = [model.config.vocab_size]  # an end-of-sequence id no model can emit: every path decodes new_tokens

paths = {"gather_once": HFGenerateRollout(engine, never, pad, True, trainer.world_size),
         "per_layer": HFGenerateRollout(engine, never, pad, False, trainer.world_size)}
blocker = hybrid_engine_blocker(model.config, cuda, cuda)
if blocker is None:
    paths["hybrid_engine"] = HybridEngineGenerate(engine, tokenizer, never, pad)


def sync():
    if cuda:
        torch.cuda.synchronize()


results, tokens = {}, {}
for name, rollout in paths.items():
    rollout.generate(request, sampling, greedy=True)  # warm-up (kernels, containers)
    times = []
    for _ in range(cli.repeats):
        sync()
        start = time.perf_counter()
        batch = rollout.generate(request, sampling, greedy=True)
        sync()
        times.append(time.perf_counter() - start)
    completions = split_completions(batch, never, pad)
    tokens[name] = completions.ids
    results[name] = {"seconds": min(times), "tokens": int(completions.lengths.sum()),
                     "tokens_per_second": int(completions.lengths.sum()) / min(times)}

base = results["gather_once"]["tokens_per_second"]
if trainer.rank != 0:
    sys.exit(0)
device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
print(f"# rollout throughput: {cli.model}, {cli.prompts} prompts x {cli.new_tokens} new tokens per rank, greedy, "
      f"ZeRO-3, {trainer.world_size} rank(s), {device_name}")
if blocker:
    print(f"# hybrid engine not run: {blocker}")
print("| path | tokens per rank | best of %d (s) | tokens/s per rank | vs gather-once | greedy tokens = gather-once |"
      % cli.repeats)
print("| --- | ---: | ---: | ---: | ---: | --- |")
for name, r in results.items():
    width = min(tokens[name].shape[1], tokens["gather_once"].shape[1])
    same = torch.equal(tokens[name][:, :width], tokens["gather_once"][:, :width])
    print(f"| {name} | {r['tokens']} | {r['seconds']:.3f} | {r['tokens_per_second']:.1f} | "
          f"{r['tokens_per_second'] / base:.2f}x | {same} |")
print(json.dumps(results))
