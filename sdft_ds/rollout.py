"""On-policy sampling under ZeRO-3, behind DeepSpeed's rollout interface.

Paths (chosen once per run by `build_rollout` and logged):
- gather_once: all ZeRO-3 parameters gathered once per rollout, Hugging Face `generate` with a KV cache;
  `synced_gpus` with several ranks, so a rank that finishes early keeps joining the others' collectives.
- per_layer: plain `generate` on the partitioned model; DeepSpeed gathers each layer at each decoding step.
  Slow, but needs only one layer's full weights at a time.
- hybrid_engine: DeepSpeed's hybrid engine (inference kernels, CUDA only, Llama/OPT/GPT-2/NeoX/J/BLOOM),
  trusted only after its greedy output matches gather_once on the same prompts and weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout import RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig
from transformers import GenerationConfig

from sdft_ds import engines

logger = logging.getLogger(__name__)


@dataclass
class Completions:
    """Sampled completions, right-padded, with the mask of tokens up to and including the first EOS."""

    ids: torch.Tensor  # (B, C)
    mask: torch.Tensor  # (B, C) 1 on tokens up to and including the first EOS
    truncated: torch.Tensor  # (B,) True where no EOS was sampled within the limit

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def completion_mask(ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask from positions, not token identity: pad may equal EOS, and chat models stop on several ids."""
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


def split_completions(batch: RolloutBatch, eos_ids: list[int], pad_id: int) -> Completions:
    """Completion tokens of a rollout whose responses all start at the same column (left-padded prompts)."""
    start = int(batch.response_start_idx[0])
    if not bool((batch.response_start_idx == start).all()):
        raise ValueError("Rollout responses start at different columns; prompts must be left-padded.")
    ids = batch.input_ids[:, start:]
    mask, truncated = completion_mask(ids, eos_ids)
    return Completions(ids.masked_fill(mask == 0, pad_id), mask, truncated)


def generation_config(sampling: SamplingConfig, eos_ids: list[int], pad_id: int, greedy: bool = False):
    """Every sampling field set explicitly: `generate` fills unset ones from the model's own generation
    config (Qwen2.5-Instruct ships repetition_penalty=1.05), which would silently change the policy."""
    return GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p, top_k=0 if greedy else max(sampling.top_k, 0),
        min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
        max_new_tokens=sampling.max_new_tokens, min_new_tokens=0, eos_token_id=list(eos_ids),
        pad_token_id=pad_id, num_return_sequences=1, use_cache=True, bad_words_ids=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None)


class HFGenerateRollout(RolloutEngine):
    """Hugging Face `generate` on a ZeRO-3 engine, the model gathered once per call or layer by layer."""

    def __init__(self, engine, eos_ids: list[int], pad_id: int, gather_once: bool, world_size: int):
        self.engine, self.eos_ids, self.pad_id = engine, eos_ids, pad_id
        self.gather_once, self.world_size = gather_once, world_size
        self.name = "gather_once" if gather_once else "per_layer"

    def generate(self, request: RolloutRequest, sampling: SamplingConfig, greedy: bool = False) -> RolloutBatch:
        lm = engines.language_model(self.engine)
        prompt_ids = request.prompt_ids.repeat_interleave(sampling.n_samples_per_prompt, 0)
        prompt_mask = request.prompt_attention_mask.repeat_interleave(sampling.n_samples_per_prompt, 0)
        was_training = lm.training
        lm.eval()
        lm.config.use_cache = True
        gather = engines.gathered_model(self.engine) if self.gather_once else engines.gathered([])
        try:
            with torch.no_grad(), gather:
                output = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                     generation_config=generation_config(sampling, self.eos_ids, self.pad_id, greedy),
                                     synced_gpus=self.world_size > 1)
        finally:
            lm.config.use_cache = False
            lm.train(was_training)
        width = prompt_ids.shape[1]
        # generate() stops at the longest completion; pad every batch to the same width is not needed.
        attention = torch.cat([prompt_mask, torch.ones_like(output[:, width:])], dim=1)
        return RolloutBatch(output, attention, torch.full((output.shape[0],), width, dtype=torch.long))

    def sync_weights(self, step: int) -> None:
        """Nothing to push: generation reads the training engine's own parameters."""


def build_rollout(engine, path: str, eos_ids: list[int], pad_id: int, world_size: int) -> RolloutEngine:
    if path in ("auto", "gather_once"):
        rollout = HFGenerateRollout(engine, eos_ids, pad_id, gather_once=True, world_size=world_size)
    elif path == "per_layer":
        rollout = HFGenerateRollout(engine, eos_ids, pad_id, gather_once=False, world_size=world_size)
    else:
        raise ValueError(f"rollout_path={path!r} is not available in this build.")
    logger.info("Generation path: %s", rollout.name)
    return rollout
