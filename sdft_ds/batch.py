"""Which tokens, with which weights, reach the loss: the micro-batch of SDFT, pure tensor code (no engine).

A micro-batch holds B completions twice: after the student's prompt and after the teacher's, both prompts
left-padded so that the completions start in one column. The loss sees the completion tokens up to and including
the first EOS (found by position: pad may equal EOS), less the first `num_loss_tokens_to_skip` of each, with weights
that fold in the reduction (SPEC §2):

- sequence: each sequence's mean over its loss tokens, the mean over the micro-batch's sequences;
- token: Σ over the step's loss tokens on all ranks and micro-batches ÷ their count.

DeepSpeed then divides the loss by the accumulation steps and averages gradients over ranks; the token weights
are scaled up by ranks × accumulation steps to undo both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sdft_ds.data import left_pad


def completion_mask(ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of tokens up to and including the first EOS, rows without one). From positions, not token identity:
    pad may equal EOS, and chat models stop on several ids."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, ids.shape[1], dtype=torch.long))
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = (positions[None, :] <= first_eos[:, None]).long()
    return mask, ~has_eos


def loss_mask(completion_mask: torch.Tensor, num_tokens_to_skip: int) -> torch.Tensor:
    """The completion mask less the first `num_tokens_to_skip` tokens of every completion (paper: 3)."""
    mask = completion_mask.clone()
    mask[:, :num_tokens_to_skip] = 0
    return mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), real tokens flush left: completions given as token lists."""
    ids, mask = left_pad([row[::-1] for row in rows], pad_id)
    return ids.flip(1), mask.flip(1)


@dataclass
class MicroBatch:
    """One micro-batch of completions with both prompts; `start` is the column of the first completion token."""

    input_ids: torch.Tensor  # (B, P + C) [left-padded prompt | completion]
    attention_mask: torch.Tensor
    start: int
    teacher_input_ids: torch.Tensor  # (B, P_T + C) [left-padded teacher prompt | completion]
    teacher_attention_mask: torch.Tensor
    teacher_start: int
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) tokens up to and including the first EOS
    loss_mask: torch.Tensor  # (B, C) completion_mask less the skipped leading tokens
    truncated: torch.Tensor  # (B,) no EOS within max_completion_length
    rollout_step: int  # optimizer steps done when the completions were sampled
    rollout_logprobs: torch.Tensor | None = None  # (B, C) log S at rollout time, when rollouts are reused

    @property
    def selected(self) -> torch.Tensor:
        """(B, C) bool: the completion tokens the student and teacher score (the loss weights some of them)."""
        return self.completion_mask.bool()

    def state_dict(self) -> dict:
        """Its fields on the CPU, for a checkpoint."""
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in asdict(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> MicroBatch:
        return cls(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()})


def micro_batch(prompts: list[list[int]], teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, truncated: torch.Tensor, *, pad_id: int, num_loss_tokens_to_skip: int,
                rollout_step: int, device: torch.device) -> MicroBatch:
    """Completions (right-padded, with their masks) joined to both prompts; columns past the longest completion
    are dropped."""
    width = int(completion_mask.sum(-1).max())
    completion_ids, completion_mask = completion_ids[:, :width].to(device), completion_mask[:, :width].to(device)

    def join(rows):
        ids, mask = left_pad(rows, pad_id)
        return (torch.cat([ids.to(device), completion_ids], 1), torch.cat([mask.to(device), completion_mask], 1),
                ids.shape[1])

    input_ids, attention_mask, start = join(prompts)
    teacher_input_ids, teacher_attention_mask, teacher_start = join(teacher_prompts)
    return MicroBatch(input_ids, attention_mask, start, teacher_input_ids, teacher_attention_mask, teacher_start,
                      completion_ids, completion_mask, loss_mask(completion_mask, num_loss_tokens_to_skip),
                      truncated, rollout_step)


def loss_tokens(micro_batches: list[MicroBatch]) -> float:
    """This rank's loss tokens in a step's micro-batches (summed over ranks for token normalisation)."""
    return float(sum(int(b.loss_mask.sum()) for b in micro_batches))


def token_weights(batch: MicroBatch, normalization: str, world_size: int, accumulation_steps: int,
                  global_loss_tokens: float) -> torch.Tensor:
    """Weights of the selected completion tokens ([N], in `selected` order) such that Σ weight·D, after
    DeepSpeed's ÷ accumulation steps and mean over ranks, is the reduction of SPEC §2."""
    mask = batch.loss_mask.float()
    if normalization == "sequence":
        weights = mask / mask.sum(-1, keepdim=True).clamp(min=1) / mask.shape[0]
    else:
        weights = mask * (world_size * accumulation_steps / max(global_loss_tokens, 1.0))
    return weights[batch.selected]
