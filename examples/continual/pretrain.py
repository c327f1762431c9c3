"""Pretrain the study's small Llama from scratch on a stream of synthetic documents (tasks.pretraining_document):
the prior skills and in-context learning. Plain PyTorch next-token training on CPU; saves a Hugging Face folder.

    python examples/continual/pretrain.py --out outputs/continual/base
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402


def batch(tokenizer, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels): right-padded documents, padding excluded from the loss."""
    docs = [tasks.pretraining_document(rng) for _ in range(size)]
    enc = tokenizer(docs, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for the pretrained model.")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)

    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    rng = random.Random(f"pretrain-{args.seed}")
    tokenizer = tasks.build_tokenizer()
    model = LlamaForCausalLM(tasks.model_config(tokenizer, args.hidden, args.layers))
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    print(f"pretraining a {params:,}-parameter Llama for {args.steps} steps of {args.batch_size} documents",
          flush=True)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(1, args.steps + 1):
        ids, labels = batch(tokenizer, rng, args.batch_size)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}: loss {sum(losses) / len(losses):.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            losses = []
    out = Path(args.out)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps({**vars(args), "parameters": params,
                                                      "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
