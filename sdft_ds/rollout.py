"""On-policy sampling under ZeRO-3, behind DeepSpeed's rollout interface.

Paths (chosen once per run by `build_rollout` and logged):
- gather_once: all ZeRO-3 parameters gathered once per rollout, Hugging Face `generate` with a KV cache, local
  to each rank (no `synced_gpus`: decoding holds no collective).
- per_layer: plain `generate` on the partitioned model; DeepSpeed gathers each layer at each decoding step, so
  ranks step together (`synced_gpus`). Slow, but needs only one layer's full weights at a time.
- hybrid_engine: DeepSpeed's hybrid engine (inference kernels, CUDA only, Llama/OPT/GPT-2/NeoX/J/BLOOM),
  trusted only after its greedy output matches gather_once on the same prompts and weights. Refused while
  `engines.hybrid_engine_incompatibility` names a reason (transformers 5: measured failing on an H200).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from deepspeed.runtime.rollout import RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig
from transformers import CompileConfig

from sdft_ds import engines, models
from sdft_ds.batch import completion_mask

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


def sampling_config(args) -> SamplingConfig:
    """DeepSpeed's sampling settings from an SDFTConfig."""
    return SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, n_samples_per_prompt=args.num_generations)


def sample(rollout: RolloutEngine, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, eos_ids: list[int],
           pad_id: int) -> Completions:
    """Completions for left-padded prompts (ids, mask), `sampling.n_samples_per_prompt` per prompt, in a row."""
    return split_completions(rollout.generate(RolloutRequest(ids, mask), sampling), eos_ids, pad_id)


def split_completions(batch: RolloutBatch, eos_ids: list[int], pad_id: int) -> Completions:
    """Completion tokens of a rollout whose responses all start at the same column (left-padded prompts)."""
    start = int(batch.response_start_idx[0])
    if not bool((batch.response_start_idx == start).all()):
        raise ValueError("Rollout responses start at different columns; prompts must be left-padded.")
    ids = batch.input_ids[:, start:]
    mask, truncated = completion_mask(ids, eos_ids)
    return Completions(ids.masked_fill(mask == 0, pad_id), mask, truncated)


def _compile_config() -> CompileConfig:
    """transformers compiles the decoding forward by itself only on accelerators; `_compile_all_devices` (a
    private switch of transformers 5, pinned <6 in pyproject) lets CPU runs use the same mechanism."""
    config = CompileConfig(fullgraph=True, dynamic=False,
                           mode="reduce-overhead" if torch.cuda.is_available() else "default")
    config._compile_all_devices = True
    return config


COMPILE_CONFIG = _compile_config()  # one object: transformers recompiles when the config compares unequal
PROMPT_WIDTH_MULTIPLE = 64  # compiled decoding: prompts padded to a multiple, so the static cache keeps its shape


def generation_config(sampling: SamplingConfig, eos_ids: list[int], pad_id: int, greedy: bool = False,
                      compiled: bool = False):
    """The rollout's sampling settings, every field explicit (models.explicit_generation_config)."""
    compile_fields = (dict(cache_implementation="static", compile_config=COMPILE_CONFIG) if compiled
                      else dict(cache_implementation=None, disable_compile=True))
    return models.explicit_generation_config(
        sample=not greedy, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=0 if greedy else max(sampling.top_k, 0), max_new_tokens=sampling.max_new_tokens, eos_ids=eos_ids,
        pad_id=pad_id, **compile_fields)


class HFGenerateRollout(RolloutEngine):
    """Hugging Face `generate` on a ZeRO-3 engine, the model gathered once per call or layer by layer.

    Gather-once runs on the whole model with ZeRO-3's hooks suspended (`engines.whole_model`): decoding is then
    local to each rank, so ranks stop at their own longest completion without `synced_gpus`. Per-layer decoding
    gathers through the hooks, a collective per layer and token, so ranks must step together (`synced_gpus`)."""

    def __init__(self, engine, eos_ids: list[int], pad_id: int, gather_once: bool, world_size: int,
                 compiled: bool = False, adapter=None):
        if compiled and not gather_once:
            raise ValueError("Compiled decoding needs the whole model (gather-once): ZeRO-3's per-layer hooks "
                             "cannot run inside a compiled graph.")
        self.engine, self.eos_ids, self.pad_id = engine, eos_ids, pad_id
        self.gather_once, self.world_size, self.compiled = gather_once, world_size, compiled
        # the LoRA adapter to generate with: a teacher's (a context that switches to it), or the student's (None)
        self.adapter = adapter or contextlib.nullcontext
        self.name = ("gather_once" if gather_once else "per_layer") + ("+compiled" if compiled else "")

    def generate(self, request: RolloutRequest, sampling: SamplingConfig, greedy: bool = False) -> RolloutBatch:
        lm = engines.language_model(self.engine)
        prompt_ids = request.prompt_ids.repeat_interleave(sampling.n_samples_per_prompt, 0)
        prompt_mask = request.prompt_attention_mask.repeat_interleave(sampling.n_samples_per_prompt, 0)
        if self.compiled:
            extra = -prompt_ids.shape[1] % PROMPT_WIDTH_MULTIPLE
            prompt_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=self.pad_id)
            prompt_mask = torch.nn.functional.pad(prompt_mask, (extra, 0), value=0)
        was_training = lm.training
        lm.eval()
        lm.config.use_cache = True
        context = engines.whole_model(self.engine) if self.gather_once else engines.hooked_inference(self.engine)
        try:
            with torch.no_grad(), context, self.adapter():
                output = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                     generation_config=generation_config(sampling, self.eos_ids, self.pad_id, greedy,
                                                                         self.compiled),
                                     synced_gpus=self.world_size > 1 and not self.gather_once
                                     and engines.partitioned(self.engine))
        finally:
            lm.config.use_cache = False
            lm.train(was_training)
        width = prompt_ids.shape[1]
        attention = torch.cat([prompt_mask, torch.ones_like(output[:, width:])], dim=1)
        return RolloutBatch(output, attention, torch.full((output.shape[0],), width, dtype=torch.long))

    def sync_weights(self, step: int) -> None:
        """Nothing to push: generation reads the training engine's own parameters."""


HYBRID_ENGINE_ARCHITECTURES = ("llama", "opt", "gpt2", "gpt_neo", "gpt_neox", "gptj", "bloom")
VALIDATION_TOKENS = 16


def hybrid_engine_blocker(config, hybrid_engine_enabled: bool, cuda: bool, lora: bool = False) -> str | None:
    """Why DeepSpeed's hybrid engine cannot serve this model, or None when it may (still to be validated)."""
    if not hybrid_engine_enabled:
        return "the student DeepSpeed config has no enabled `hybrid_engine` section"
    if lora:
        return "its inference containers replace the linear layers that carry the LoRA adapters"
    if not cuda:
        return "the hybrid engine's inference kernels need CUDA"
    if config.model_type not in HYBRID_ENGINE_ARCHITECTURES:
        return f"DeepSpeed has no hybrid-engine policy for {config.model_type!r}"
    if config.model_type == "llama":
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            return "its Llama policy has no scaled RoPE (Llama 3.1+)"
        if getattr(config, "num_key_value_heads", config.num_attention_heads) != config.num_attention_heads:
            return "its Llama policy is not GQA-aware"
    return None


class HybridEngineGenerate(RolloutEngine):
    """DeepSpeed's HybridEngineRollout, with what it leaves to the caller: the engine's eval/train switch
    (which swaps the inference containers in and out) and sampling settings the model cannot override."""

    name = "hybrid_engine"

    def __init__(self, engine, tokenizer, eos_ids: list[int], pad_id: int):
        from deepspeed.runtime.rollout import RolloutConfig, build_rollout as build_deepspeed_rollout

        self.engine, self.eos_ids, self.pad_id = engine, eos_ids, pad_id
        self.rollout = build_deepspeed_rollout(RolloutConfig(engine="hybrid_engine"), student_engine=engine,
                                               tokenizer=tokenizer)

    def generate(self, request: RolloutRequest, sampling: SamplingConfig, greedy: bool = False) -> RolloutBatch:
        lm = engines.language_model(self.engine)
        saved_config = lm.generation_config
        lm.generation_config = generation_config(sampling, self.eos_ids, self.pad_id, greedy)
        if greedy:
            sampling = SamplingConfig(**{**sampling.__dict__, "temperature": 0.0})
        self.engine.eval()
        try:
            with torch.no_grad():
                return self.rollout.generate(request, sampling)
        finally:
            self.engine.train()
            lm.generation_config = saved_config

    def sync_weights(self, step: int) -> None:
        """The hybrid engine reads the training parameters directly."""


class ValidatedRollout(RolloutEngine):
    """Trusts a fast path only after its greedy tokens equal the reference path's on the first real prompts;
    otherwise warns and uses the reference for the rest of the run. All ranks decide together.

    A fast path that raises on some ranks only may leave the others inside one of its collectives, where no
    verdict can reach them. The verdict therefore travels on a group of its own with a timeout: a rank that
    failed waits at most `timeout_s` for the others, then stops the run with an error (the launcher then ends the
    ranks still waiting) instead of hanging."""

    def __init__(self, fast: RolloutEngine, reference: RolloutEngine, timeout_s: float = 300.0):
        self.fast, self.reference, self.checked = fast, reference, False
        self.name = fast.name
        self.timeout_s = timeout_s
        self.verdicts = engines.side_group(timeout_s)  # collective: every rank builds it here

    def _agrees(self, request: RolloutRequest, sampling: SamplingConfig) -> bool:
        probe = SamplingConfig(max_new_tokens=min(VALIDATION_TOKENS, sampling.max_new_tokens))
        expected = self.reference.generate(request, probe, greedy=True)
        try:
            produced = self.fast.generate(request, probe, greedy=True)
            width = min(produced.input_ids.shape[1], expected.input_ids.shape[1])
            agree = torch.equal(produced.input_ids[:, :width], expected.input_ids[:, :width])
        except Exception as error:  # a broken kernel path must cost speed, never the run
            logger.warning("%s generation failed during validation: %r", self.fast.name, error)
            agree = False
        try:
            disagreements = engines.all_reduce_sum(torch.tensor([0.0 if agree else 1.0]), group=self.verdicts)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.fast.name} generation failed on some ranks and the others did not reach the verdict within "
                f"{self.timeout_s:.0f} s (they are most likely waiting in one of its collectives). Set "
                "rollout_path='gather_once' to skip it.") from error
        engines.release_group(self.verdicts)  # one verdict per run
        return float(disagreements) == 0.0

    def generate(self, request: RolloutRequest, sampling: SamplingConfig, greedy: bool = False) -> RolloutBatch:
        if not self.checked:
            self.checked = True
            if self._agrees(request, sampling):
                logger.info("%s generation validated against %s (greedy tokens match).", self.fast.name,
                            self.reference.name)
            else:
                logger.warning("%s generation disagrees with %s on the same prompts and weights; falling back to "
                               "%s for this run.", self.fast.name, self.reference.name, self.reference.name)
                self.fast, self.name = self.reference, self.reference.name
        return self.fast.generate(request, sampling, greedy=greedy)

    def sync_weights(self, step: int) -> None:
        self.fast.sync_weights(step)


def build_rollout(engine, path: str, tokenizer, eos_ids: list[int], pad_id: int, world_size: int,
                  hybrid_engine_enabled: bool, compiled: bool = False, lora: bool = False,
                  adapter=None) -> RolloutEngine:
    """The generation path for `engine`: `path` from SDFTConfig.rollout_path, `auto` deciding by model,
    device and memory. Logged once. LoRA: the adapter stays unmerged while generating (`adapter` picks which);
    merging it into the base weights and out again is not exact in 16 bits, and the base weights are also the
    frozen teacher."""
    gather_once = HFGenerateRollout(engine, eos_ids, pad_id, gather_once=True, world_size=world_size,
                                    compiled=compiled, adapter=adapter)
    per_layer = HFGenerateRollout(engine, eos_ids, pad_id, gather_once=False, world_size=world_size, adapter=adapter)
    config = engines.language_model(engine).config
    blocker = hybrid_engine_blocker(config, hybrid_engine_enabled, torch.cuda.is_available(), lora)
    if path == "hybrid_engine" and blocker:
        raise ValueError(f"rollout_path='hybrid_engine' is not possible: {blocker}. Use rollout_path='auto'.")
    fits = engines.fits_gathered(engine)
    if path == "auto":
        path = "hybrid_engine" if blocker is None else "gather_once" if fits else "per_layer"
        reason = blocker if blocker else "validated against gather_once"
        if not fits:
            reason = "the gathered model would not fit in free device memory"
    else:
        reason = "set by rollout_path"
    if path == "hybrid_engine":
        rollout = ValidatedRollout(HybridEngineGenerate(engine, tokenizer, eos_ids, pad_id),
                                   gather_once if fits else per_layer)
    else:
        rollout = gather_once if path == "gather_once" else per_layer
    if compiled and rollout is not gather_once:
        logger.warning("compile_generation is ignored: the %s path does not run the whole gathered model.",
                       rollout.name)
    logger.info("Generation path: %s (%s)", rollout.name, reason)
    return rollout
