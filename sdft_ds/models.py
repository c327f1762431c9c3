"""What sdft_ds must know about a model's architecture: whether student and teacher pair, how its output layer
makes logits, which ids end a completion and how it generates, where its dropout lives. Read from configs before any model is loaded where the config says it, from
the loaded modules otherwise — always before an engine is built.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

from sdft_ds.divergence import IDENTITY, LogitTransform

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def pretrained_source(name_or_path, role: str) -> str:
    """`name_or_path` for from_pretrained, refused at once when it must be a local folder and is none: transformers
    would take it for a hub id ("Repo id must be in the form ...") or try the network for it. A hub id is
    `name` or `org/name`; a Path, or a name starting with `.`, `/` or `~` or with more folders, is local."""
    name = str(name_or_path)
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{role}: {name} is a file; pass the folder that holds config.json and the "
                                     "weights.")
        return name
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local or isinstance(name_or_path, Path):
        tilde = " (a ~ is expanded by the shell only; write the full path)" if name.startswith("~") else ""
        raise FileNotFoundError(f"no such folder: {name} ({role}){tilde}. Pass an existing model folder or a hub "
                                "name such as Qwen/Qwen3-8B.")
    return name


@contextlib.contextmanager
def hub_errors(name: str, role: str):
    """One short error naming the model where transformers chains several tracebacks about the hub."""
    try:
        yield
    except OSError as error:
        if isinstance(error.__cause__, LocalEntryNotFoundError):
            raise OSError(f"{role} {name!r} is not in the local Hugging Face cache and the hub is unreachable (no "
                          "network, or HF_HUB_OFFLINE=1). Download it where the hub is reachable (`hf download "
                          f"{name}`), or pass a local folder.") from None
        if isinstance(error.__cause__, RepositoryNotFoundError):
            raise OSError(f"{role} {name!r} is neither a local folder nor a model on the Hugging Face hub (for a "
                          "private one, log in with `hf auth login`).") from None
        raise


def config_of(model, init_kwargs: dict | None = None, role: str = "model"):
    """The Hugging Face config of a model object, path or hub name, without loading weights."""
    if isinstance(model, PreTrainedModel):
        return model.config
    name = pretrained_source(model, role)
    with hub_errors(name, role):
        return AutoConfig.from_pretrained(name, **(init_kwargs or {}).get("config_kwargs", {}))


def ships_tokenizer(name_or_path: str) -> bool:
    """A local folder without tokenizer files would load as an empty tokenizer; hub names are checked."""
    path = Path(name_or_path)
    if not path.is_dir():
        return not path.exists()
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def _architecture_key(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {k: getattr(config, k, None) for k in keys}


def check_topk(config, mode: str, top_k: int) -> None:
    """A top-k support cannot be wider than the vocabulary (torch.topk would fail at the first step)."""
    if mode == "topk" and top_k > config.vocab_size:
        raise ValueError(f"distillation_topk={top_k} exceeds the model's vocabulary ({config.vocab_size} entries): "
                         "lower it, or use distillation_mode='full' for the whole vocabulary.")


def check_pair(student_config, teacher_config, tokenizer, ref_model, teacher_mode: str) -> None:
    """Student and teacher must score the same vocabulary with the student's tokenizer; an EMA teacher must have
    the student's architecture. Refused before any model is loaded."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(f"Student and teacher vocabularies differ ({student_config.vocab_size} vs "
                         f"{teacher_config.vocab_size} rows): the divergence compares distributions over the "
                         "same tokens. Use a teacher that shares the student's tokenizer.")
    if len(tokenizer) > student_config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{student_config.vocab_size} embedding rows; pass the model's own tokenizer.")
    if isinstance(ref_model, str) and ships_tokenizer(ref_model):
        if AutoTokenizer.from_pretrained(ref_model).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"The teacher {ref_model!r} ships a different tokenizer from the student's; SDFT "
                             "needs one shared vocabulary.")
    if teacher_mode == "ema" and _architecture_key(teacher_config) != _architecture_key(student_config):
        raise ValueError(f"teacher_mode='ema' averages student weights into the teacher, so both need one "
                         f"architecture; student {_architecture_key(student_config)} vs teacher "
                         f"{_architecture_key(teacher_config)}. Use teacher_mode='frozen' or drop ref_model.")


def _softcapped(c) -> LogitTransform:
    return LogitTransform(softcap=c.final_logit_softcapping)


def _scaled(c) -> LogitTransform:
    return LogitTransform(scale=c.logit_scale)


def _divided(c) -> LogitTransform:  # Granite divides...
    return LogitTransform(scale=1 / c.logits_scaling)


# Output layers that do more than logits = h·Wᵀ, and what they do (transformers 5: modeling_<type>.py).
_TRANSFORMS = {"gemma2": _softcapped, "gemma3_text": _softcapped, "cohere": _scaled, "cohere2": _scaled,
               "granite": _divided, "granitemoe": _divided}
# ...and HyperCLOVA X multiplies by an attribute of the same name: these names alone do not say what to do.
_LOGIT_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")
_BIASED_HEADS = ("gptj", "codegen", "phi")  # lm_head = nn.Linear(..., bias=True)

DROPOUT_ATTRIBUTES = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                      "attn_dropout", "activation_dropout", "summary_first_dropout")


def _refuse_head(model_type: str, what: str) -> ValueError:
    return ValueError(f"model_type {model_type!r}: {what}. sdft_ds's fused output head computes the divergence from "
                      "hidden states and the output weight, so it would train this model against a different "
                      "distribution from the one it samples; it is refused rather than trained wrong. Supported "
                      f"output-layer transforms: plain h·Wᵀ and {sorted(_TRANSFORMS)}.")


def logit_transform(config) -> LogitTransform:
    """The transform of h·Wᵀ this model's output layer applies; refuses a model whose config says its logits are
    made otherwise in a way the fused head does not implement."""
    model_type = getattr(config, "model_type", "?")
    if model_type in _TRANSFORMS:
        return _TRANSFORMS[model_type](config)
    if model_type in _BIASED_HEADS:
        raise _refuse_head(model_type, "its output layer adds a bias (lm_head.bias)")
    unknown = {name: value for name in _LOGIT_ATTRIBUTES
               if (value := getattr(config, name, None)) is not None and value != 1}
    if unknown:
        raise _refuse_head(model_type, f"its config sets {unknown}, which change how its output layer makes logits")
    return IDENTITY


def check_output_layer(lm: nn.Module) -> None:
    """Refuse a loaded model whose output layer has a bias (one the config could not tell us about)."""
    if getattr(lm.get_output_embeddings(), "bias", None) is not None:
        raise _refuse_head(getattr(lm.config, "model_type", type(lm).__name__),
                           "its output layer adds a bias (lm_head.bias)")


def eos_ids(tokenizer, *lms: nn.Module) -> list[int]:
    """Ids that end a completion: the tokenizer's EOS and every model's `generation_config.eos_token_id` (an
    instruct teacher may end its turns with an id the student's base config does not list)."""
    ids = {tokenizer.eos_token_id}
    for lm in lms:
        configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def explicit_generation_config(*, sample: bool, temperature: float, top_p: float, top_k: int | None,
                               max_new_tokens: int, eos_ids: list[int], pad_id: int, **extra) -> GenerationConfig:
    """Every sampling field set explicitly: `generate` fills unset ones from the checkpoint's generation_config.json
    (Qwen2.5-Instruct ships repetition_penalty=1.05), which would silently change the rollout policy or an eval
    score. `extra`: the cache and compile fields."""
    greedy = not sample
    return GenerationConfig(
        do_sample=sample, temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=top_k,
        min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(eos_ids), pad_token_id=pad_id,
        num_return_sequences=1, use_cache=True, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_bos_token_id=None, forced_eos_token_id=None, **extra)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: nn.Dropout modules, and the probabilities that attention modules copy from the
    config at build time (Qwen2 and Llama pass `self.attention_dropout` to the attention kernel)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    for name in DROPOUT_ATTRIBUTES:
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
