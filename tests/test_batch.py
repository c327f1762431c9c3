"""sdft_ds.batch without engines: which tokens reach the loss, and weights that give SPEC §2's reductions once
DeepSpeed has divided by the accumulation steps and averaged over ranks."""

import ast
from pathlib import Path

import pytest
import torch

from sdft_ds.batch import MicroBatch, completion_mask, loss_tokens, micro_batch, right_pad, token_weights

RANKS, ACCUMULATION, SKIP, EOS, PAD = 2, 2, 1, 2, 0


def random_micro_batch(generator, rows=3, width=7) -> MicroBatch:
    prompts = [torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(rows)]
    ids = torch.randint(3, 50, (rows, width), generator=generator)
    ends = torch.randint(0, width + 2, (rows,), generator=generator)  # past the width: truncated, no EOS
    for row, end in enumerate(ends.tolist()):
        if end < width:
            ids[row, end] = EOS
    mask, truncated = completion_mask(ids, [EOS])
    return micro_batch(prompts, prompts, ids.masked_fill(mask == 0, PAD), mask, truncated, pad_id=PAD,
                       num_loss_tokens_to_skip=SKIP, rollout_step=0, device=torch.device("cpu"))


@pytest.mark.parametrize("seed", range(5))
def test_token_weights_give_the_global_token_and_sequence_means(seed):
    generator = torch.Generator().manual_seed(seed)
    per_rank = [[random_micro_batch(generator) for _ in range(ACCUMULATION)] for _ in range(RANKS)]
    divergence = [[torch.rand(b.completion_ids.shape, generator=generator, dtype=torch.float64) for b in rank]
                  for rank in per_rank]
    step_tokens = sum(loss_tokens(rank) for rank in per_rank)  # the all-reduce of the trainer

    def deepspeed_loss(normalization):  # Σ over micro-batches ÷ accumulation, then the mean over ranks
        losses = [sum((token_weights(b, normalization, RANKS, ACCUMULATION, step_tokens).double()
                       * d[b.selected]).sum() for b, d in zip(rank, ds)) / ACCUMULATION
                  for rank, ds in zip(per_rank, divergence)]
        return sum(losses) / RANKS

    masks = [b.loss_mask.double() for rank in per_rank for b in rank]
    values = [d for ds in divergence for d in ds]
    token_mean = sum((m * d).sum() for m, d in zip(masks, values)) / sum(m.sum() for m in masks)
    sequence_means = torch.cat([(m * d).sum(-1) / m.sum(-1).clamp(min=1) for m, d in zip(masks, values)])
    torch.testing.assert_close(deepspeed_loss("token"), token_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(deepspeed_loss("sequence"), sequence_means.mean(), rtol=1e-6, atol=0)


def test_loss_mask_starts_after_the_skipped_tokens_and_ends_at_the_first_eos():
    batch = micro_batch([[7, 8], [9]], [[7], [9, 9, 9]], torch.tensor([[4, EOS, PAD, PAD], [4, 5, 6, EOS]]),
                        torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), torch.tensor([False, False]), pad_id=PAD,
                        num_loss_tokens_to_skip=SKIP, rollout_step=3, device=torch.device("cpu"))
    assert batch.loss_mask.tolist() == [[0, 1, 0, 0], [0, 1, 1, 1]]
    assert batch.start == 2 and batch.teacher_start == 3
    assert batch.input_ids.tolist() == [[7, 8, 4, EOS, PAD, PAD], [PAD, 9, 4, 5, 6, EOS]]
    assert batch.teacher_attention_mask.tolist() == [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    restored = MicroBatch.from_state_dict(batch.state_dict(), torch.device("cpu"))
    assert all(torch.equal(getattr(restored, k), getattr(batch, k)) for k in ("input_ids", "loss_mask"))


def test_right_pad_puts_tokens_flush_left():
    ids, mask = right_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# The DeepSpeed boundary: these modules may import deepspeed, no other package module does (README).
DEEPSPEED_MODULES = {"engines.py": "engines, gathers, ZeRO-3 internals, checkpoints",
                     "rollout.py": "implements DeepSpeed's rollout interface (RolloutEngine, hybrid engine)"}


def test_only_the_named_modules_import_deepspeed():
    package = Path(__file__).resolve().parent.parent / "sdft_ds"
    importing = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                importing.add(path.relative_to(package).as_posix())
    assert importing == set(DEEPSPEED_MODULES), importing
