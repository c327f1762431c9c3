"""SDFTConfig: every setting of a run, with its default in one place.

Field names follow Hugging Face `TrainingArguments` where one exists, and TRL's `SDFTConfig` for the
self-distillation fields, so that recipes written for those read the same here. Where TRL names or spells a setting
otherwise (teacher_model_kind, distillation_mode='topk_logits', ...), SDFTConfig takes its spelling too (TRL_ALIASES
at the end of this file), and refuses by name the TRL settings it does not implement (TRL_UNSUPPORTED).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import numbers
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdft_ds.divergence_defaults import MODES as DISTILLATION_MODES
from sdft_ds.divergence_defaults import TOKEN_CHUNK, VOCAB_CHUNK

# The installed package (site-packages/sdft_ds after `pip install`, the checkout's sdft_ds/ when editable): the
# DeepSpeed configs ship in it as package data, and the checkout's top-level ds_configs/ is a link to them.
PACKAGE_DIR = Path(__file__).resolve().parent
DS_CONFIG_DIR = PACKAGE_DIR / "ds_configs"

METHODS = ("sdft", "sft")
TEACHER_MODES = ("frozen", "ema", "live")
LOSS_NORMALIZATIONS = ("sequence", "token")
DIVERGENCE_IMPLS = ("chunked", "dense")
ROLLOUT_PATHS = ("auto", "hybrid_engine", "gather_once", "per_layer")
REPORT_TO = ("none", "wandb", "tensorboard")
LOG_LEVELS = ("debug", "info", "warning", "error")
# transformers schedulers that get_scheduler cannot build or step with only warm-up and total steps: they need
# lr_scheduler_kwargs or a metric at each step, which sdft_ds does not pass.
SCHEDULERS_NEEDING_ARGUMENTS = ("reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                                "warmup_stable_decay")
DS_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size")  # DeepSpeed refuses a config with neither


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "a dict",
               type(None): "None"}


def field_types(annotation) -> set[type]:
    """The types a field's evaluated annotation allows: `int | None` -> {int, NoneType}."""
    return set(typing.get_args(annotation)) or {annotation}


def describe(kinds: set[type]) -> str:
    """`{int, NoneType}` -> "an integer or None"."""
    return " or ".join(_TYPE_WORDS[k] for k in sorted(kinds, key=list(_TYPE_WORDS).index))


def _as_field_type(name: str, value, kinds: set[type]):
    """`value` as its field's type, or a ValueError naming both: an int field takes an integral number (2.0 -> 2)
    and a float field any finite number; a bool is no number here and nothing else is converted."""
    if value is None:
        if type(None) in kinds:
            return None
    elif isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, numbers.Real) and (float in kinds or int in kinds):
        if float in kinds and math.isfinite(value):
            return float(value)
        if float not in kinds and float(value).is_integer():
            return int(value)
    elif isinstance(value, tuple(kinds - {bool, int, float, type(None)})):
        return value
    raise ValueError(f"{name} must be {describe(kinds)}, got {value!r} ({type(value).__name__}).")


def package_path(name: str | Path) -> str | Path:
    """A path as a recipe or the command line names it, found from any working directory: as written where it
    exists there (or is absolute), so that a user's own file wins; else the installed package's copy of a path
    written from the checkout's root, `sdft_ds/...` (sdft_ds/assets/models/tiny-qwen2-student) or `ds_configs/...`;
    else as written, for the error that follows to name."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return name
    head, *rest = path.parts or ("",)
    base = {"sdft_ds": PACKAGE_DIR, "ds_configs": DS_CONFIG_DIR}.get(head)
    if base is not None and rest and base.joinpath(*rest).exists():
        return str(base.joinpath(*rest))
    return name


def ds_config_file(source: str | Path) -> Path:
    """The file of a DeepSpeed config named by a path (package_path) or, where the working directory has no file of
    that name, by the bare name of a shipped one: `zero0.json` is DS_CONFIG_DIR/zero0.json."""
    path = Path(package_path(source))
    if not path.exists() and len(path.parts) == 1 and (DS_CONFIG_DIR / path).is_file():
        return DS_CONFIG_DIR / path
    return path


def read_ds_config(source: str | dict, role: str | None = None) -> dict:
    """A DeepSpeed config (a JSON file or a dict) checked for what DeepSpeed would otherwise refuse only while it
    builds an engine: a JSON object, a batch size key, NVMe offload to an existing folder. `role` (student or
    teacher) names the setting in the messages."""
    where = f"The {role} DeepSpeed config ({'deepspeed' if role == 'student' else 'teacher_deepspeed'})" if role \
        else "The DeepSpeed config"
    if isinstance(source, dict):
        config = json.loads(json.dumps(source))  # a deep copy that DeepSpeed's filling cannot alias
    else:
        path = ds_config_file(source)
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
            raise FileNotFoundError(f"{where} {str(source)!r} does not exist; pass a path to a JSON file, or the name "
                                    f"of one shipped in {DS_CONFIG_DIR}: {shipped}.")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} {str(source)!r} is not valid JSON: {error}. Fix the file, or start from one "
                             "in ds_configs/.") from None
        where = f"{where} {str(source)!r}"
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a JSON object of DeepSpeed settings, not {type(config).__name__}.")
    if not any(key in config for key in DS_BATCH_KEYS):
        raise ValueError(f"{where} sets neither {' nor '.join(DS_BATCH_KEYS)}, and DeepSpeed needs one; add "
                         '"train_micro_batch_size_per_gpu": "auto" (filled from per_device_train_batch_size), as '
                         "the files in ds_configs/ do.")
    if role == "student" and "optimizer" not in config:
        raise ValueError(f"{where} has no 'optimizer' section. Add one (see ds_configs/zero3_offload.json) so "
                         "DeepSpeed builds its own, e.g. DeepSpeedCPUAdam under optimizer offload.")
    zero = config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key) or {}
        if offload.get("device") == "nvme" and not Path(str(offload.get("nvme_path"))).is_dir():
            raise ValueError(f"{where} offloads to NVMe (zero_optimization.{key}.device = nvme) but its "
                             f"zero_optimization.{key}.nvme_path = {offload.get('nvme_path')!r} is no existing "
                             "folder. Create it on a fast local disk and point nvme_path at it, or offload to "
                             '"cpu".')
    return config


@functools.cache
def _field_kinds() -> dict[str, set[type]]:
    hints = typing.get_type_hints(SDFTConfig)  # the annotations are strings (from __future__ import annotations)
    return {f.name: field_types(hints[f.name]) for f in fields(SDFTConfig)}


@dataclass
class SDFTConfig:
    """Settings of an SDFT run. Each field's `help` is shown by `launch/train.py --help`."""

    # ---- Hugging Face TrainingArguments names ----
    output_dir: str = _help("Where the trained model and checkpoints go.", default="sdft-model")
    learning_rate: float = _help("Peak learning rate of the student (paper: 1e-5).", default=1e-5)
    per_device_train_batch_size: int = _help("Completions per micro-batch per rank.", default=1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    num_train_epochs: float = _help("Passes over the prompts (ignored when max_steps > 0).", default=1.0)
    max_steps: int = _help("Optimizer steps to run; -1 derives them from num_train_epochs.", default=-1)
    lr_scheduler_type: str = _help("A transformers scheduler name (linear, cosine, constant, ...).",
                                   default="linear")
    warmup_ratio: float = _help("Fraction of the optimizer steps spent warming up the learning rate.",
                                default=0.0)
    warmup_steps: int = _help("Warm-up optimizer steps; overrides warmup_ratio when > 0.", default=0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0)
    logging_steps: int = _help("Log metrics every this many optimizer steps.", default=10)
    save_steps: int = _help("Write a resumable DeepSpeed checkpoint every this many optimizer steps; 0: none "
                            "except on SIGTERM/SIGUSR1. The trained model is exported at the end either way.",
                            default=0)
    seed: int = _help("Seed of data order, sampling and initialisation.", default=42)
    bf16: bool = _help("Train in bfloat16 (fills `bf16.enabled: auto`).", default=False)
    fp16: bool = _help("Train in float16 (fills `fp16.enabled: auto`).", default=False)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass.", default=False)
    report_to: str = _help("`none`, `wandb` (rank 0 only; WANDB_MODE=offline works without network) or "
                           "`tensorboard` (event files in <output_dir>/runs/<run>).",
                           default="none")
    run_name: str | None = _help("Run name for Weights & Biases; also the TensorBoard folder "
                                 "<output_dir>/runs/<run_name> (default: the start time).", default=None)
    deepspeed: str | dict | None = _help("Student DeepSpeed config (path or dict); default "
                                         "ds_configs/zero3_offload.json. ZeRO-0/1/2 configs (zero0.json, "
                                         "zero2_offload.json, ...) are faster where the model fits whole on each "
                                         "device (README). `auto` values are filled from this config.",
                                         default=None)
    save_total_limit: int | None = _help("Keep only this many newest checkpoints (older step-N folders are deleted "
                                         "after a new one is complete); None keeps all. After a resume from an "
                                         "older checkpoint, folders numbered above it are kept and not counted.",
                                         default=None)
    resume_from_checkpoint: str | None = _help("Continue a run from a checkpoint written every save_steps or on "
                                               "SIGTERM/SIGUSR1: a `checkpoints` folder (its latest), one of its "
                                               "`step-N` folders, or `latest` for <output_dir>/checkpoints. Needs "
                                               "the same number of ranks and settings.", default=None)
    save_on_each_node: bool = _help("Write checkpoints on every node's local disk.", default=False)
    overwrite_output_dir: bool = _help("Start afresh in an output_dir that holds an earlier run's checkpoints, "
                                       "deleting them (without it such a run is refused, so that a later resume "
                                       "cannot continue the wrong run).", default=False)
    max_consecutive_nonfinite: int = _help("Stop after this many optimizer steps in a row with a non-finite loss or "
                                           "gradients (each is skipped on every rank).", default=10)
    push_to_hub: bool = _help("Push the final model to the Hub at the end of train().", default=False)
    hub_model_id: str | None = _help("Hub repository for push_to_hub().", default=None)
    hub_private_repo: bool = _help("Create the Hub repository as private.", default=False)

    # ---- model construction ----
    model_init_kwargs: dict | None = _help("Keyword arguments of from_pretrained when a model is given as a "
                                           "path or name.", default=None)
    attn_implementation: str | None = _help("Attention kernel; default flash_attention_2 on CUDA when flash-attn "
                                            "is installed, else sdpa.", default=None)
    disable_dropout: bool = _help("Turn dropout off in student and teacher.", default=True)

    # ---- LoRA (peft) ----
    use_peft: bool = _help("Train a LoRA adapter instead of the whole student (peft): only the adapter's parameters "
                           "get gradients and optimizer state. Without ref_model the teacher needs no second copy of "
                           "the weights: frozen = the student with its adapter disabled (the base model), ema = a "
                           "second adapter averaged from the student's, live = the student with its adapter. "
                           "SDFTTrainer(peft_config=LoraConfig(...)) sets it from code, and then the lora_* fields "
                           "are not read.", default=False)
    lora_r: int = _help("LoRA rank (use_peft).", default=16)
    lora_alpha: int = _help("LoRA scaling numerator: the update is lora_alpha / lora_r · B·A (use_peft).", default=32)
    lora_dropout: float = _help("Dropout on the adapter's input in the student's forward (use_peft; disable_dropout "
                                "does not touch it).", default=0.0)
    lora_target_modules: str = _help("Linear layers given an adapter (use_peft): comma-separated module names "
                                     "(q_proj,k_proj,v_proj,o_proj) or all-linear (every linear layer except the "
                                     "output layer).", default="all-linear")
    save_merged_model: bool = _help("use_peft: besides the adapter in output_dir (PEFT format), export the base model "
                                    "with the adapter merged into its weights to <output_dir>/merged.", default=False)

    # ---- method ----
    method: str = _help("sdft: self-distillation (on-policy completions, the teacher's divergence). sft: the "
                        "supervised baseline on the same engines, optimizer, scheduler and batching: mean "
                        "cross-entropy of each row's reference `completion` column (text, or an assistant message "
                        "for chat prompts) after its `prompt`, prompt tokens masked. SFT builds no teacher and "
                        "generates nothing, so the teacher, generation and divergence settings do not apply to it; "
                        "a micro-batch holds per_device_train_batch_size rows.", default="sdft")

    # ---- teacher ----
    teacher_deepspeed: str | dict | None = _help("Teacher DeepSpeed config (inference only, no optimizer); "
                                                 "default ds_configs/teacher_zero3.json under a ZeRO-3 student, "
                                                 "ds_configs/teacher_zero0.json (whole on each rank) under a "
                                                 "ZeRO-0/1/2 student, whose model fits whole.", default=None)
    teacher_mode: str = _help("frozen: the teacher keeps its initial weights; ema: θ_T ← (1−r)θ_T + rθ_S every "
                              "teacher_sync_steps; live: the teacher is the current student.", default="frozen")
    teacher_update_rate: float = _help("EMA rate r (paper: 0.01).", default=0.01)
    teacher_sync_steps: int = _help("Optimizer steps between EMA updates (paper: 1).", default=1)
    generate_from_teacher: bool = _help("Sample completions from the teacher given the teacher prompt; the "
                                        "student still trains on [prompt | completion].", default=False)
    teacher_prompt_template: str = _help("Builds teacher_prompt from prompt and privileged_context when the "
                                         "dataset has no teacher_prompt column.",
                                         default="{prompt}\n\n{privileged_context}")

    # ---- prompts and generation ----
    max_prompt_length: int = _help("Student prompts longer than this are cut from the left (counted).",
                                   default=512)
    max_teacher_prompt_length: int = _help("Own limit of the teacher prompt. A longer one loses the end of its "
                                           "privileged_context (counted), never the question; one whose context "
                                           "cannot be found in it is refused.", default=1024)
    max_completion_length: int = _help("Tokens sampled per completion.", default=256)
    num_generations: int = _help("Completions sampled per prompt (paper: 1).", default=1)
    temperature: float = _help("Sampling temperature; also τ of the divergence.", default=1.0)
    top_p: float = _help("Nucleus sampling mass.", default=1.0)
    top_k: int = _help("Top-k sampling (0 disables).", default=0)
    steps_per_generation: int | None = _help("Micro-batches served by one generated batch (TRL semantics); "
                                             "default gradient_accumulation_steps. Larger values reuse "
                                             "rollouts across optimizer steps.", default=None)
    num_iterations: int = _help("Passes over each generated batch.", default=1)
    rollout_path: str = _help("auto | hybrid_engine | gather_once | per_layer (see README).", default="auto")
    compile_generation: bool = _help("Decode with a static KV cache and a torch.compile'd forward (transformers' "
                                     "compiled generation; CUDA graphs on GPU). The first rollout pays the "
                                     "compilation (about 35 s for a 6 M model on 2 CPU cores). Greedy tokens equal "
                                     "eager decoding in fp32 on CPU; in bf16 on an H200 they differed on an "
                                     "untrained 1 B Llama (near-tied logits). Gather-once (and unpartitioned) "
                                     "generation only.",
                                     default=False)
    chat_template_kwargs: dict | None = _help("Extra arguments of apply_chat_template.", default=None)

    # ---- divergence ----
    distillation_alpha: float = _help("0: forward KL(T‖S) (paper); 1: reverse KL(S‖T); between: generalized "
                                      "JSD. The family is not continuous at 0 and 1.", default=0.0)
    distillation_mode: str = _help("full | topk | sampled_token (needs alpha = 1).", default="full")
    distillation_topk: int = _help("Student top-k support size when distillation_mode = topk.", default=100)
    distillation_add_tail: bool = _help("Top-k: keep the leftover mass as one bucket instead of "
                                        "renormalising.", default=False)
    distillation_is_clip: float | None = _help("Upper clip of the importance ratio applied to stale rollouts.",
                                               default=2.0)
    num_loss_tokens_to_skip: int = _help("Leading completion tokens left out of the loss (paper: 3); SDFT only: "
                                         "SFT trains on every token of the reference completion.", default=0)
    loss_normalization: str = _help("sequence: mean over each sequence's tokens, then over sequences; "
                                    "token: sum over the global batch's tokens / their count.", default="sequence")
    divergence_impl: str = _help("chunked (default): the fused divergence, one token_chunk × vocab_chunk tile of "
                                 "logits at a time. dense: the reference path for checking the chunked one on your "
                                 "model and settings; it holds the full [tokens × vocabulary] logits and their "
                                 "gradient (memory O(N·V)).", default="chunked")
    divergence_token_chunk: int = _help("Tokens per tile of the chunked divergence (the default × a 152k "
                                        "vocabulary is a 78 MB fp32 tile).", default=TOKEN_CHUNK)
    divergence_vocab_chunk: int = _help("Vocabulary entries per tile; the default covers a whole 150k-260k "
                                        "vocabulary in one tile, which benchmarks/divergence.py measured "
                                        "fastest at the same bounded memory.", default=VOCAB_CHUNK)

    # ---- tracking and console ----
    sample_table_steps: int = _help("Every this many optimizer steps, log a table of sampled completions (prompt, "
                                    "teacher prompt, completion, per-token divergence) to report_to; 0: never.",
                                    default=100)
    sample_table_rows: int = _help("Completions per sample table (rank 0's, from the step's first micro-batch).",
                                   default=4)
    deepspeed_log_level: str = _help("Level of DeepSpeed's own log on the ranks: debug, info, warning, error. The "
                                     "launcher's lines follow its own flag: launch/run.sh --log_level warning ...",
                                     default="warning")

    def __post_init__(self) -> None:
        for name, kinds in _field_kinds().items():  # first: every later check compares numbers
            setattr(self, name, _as_field_type(name, getattr(self, name), kinds))

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(allowed)}.")

        choice("method", METHODS)
        choice("teacher_mode", TEACHER_MODES)
        choice("distillation_mode", DISTILLATION_MODES)
        choice("loss_normalization", LOSS_NORMALIZATIONS)
        choice("divergence_impl", DIVERGENCE_IMPLS)
        choice("rollout_path", ROLLOUT_PATHS)
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_prompt_length",
                    "max_teacher_prompt_length", "max_completion_length", "num_generations", "num_iterations",
                    "teacher_sync_steps", "logging_steps", "divergence_token_chunk", "divergence_vocab_chunk",
                    "distillation_topk", "max_consecutive_nonfinite", "lora_r", "lora_alpha")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"distillation_alpha must be in [0, 1], got {self.distillation_alpha}.")
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ValueError("distillation_mode='sampled_token' is the REINFORCE surrogate of reverse KL: set "
                             f"distillation_alpha=1.0 (got {self.distillation_alpha}).")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.teacher_update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate must be in [0, 1], got {self.teacher_update_rate}.")
        if self.distillation_is_clip is not None and self.distillation_is_clip <= 0:
            raise ValueError(f"distillation_is_clip must be > 0 or None, got {self.distillation_is_clip}.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be at least 1 or None, got {self.save_total_limit}.")
        non_negative = ("num_loss_tokens_to_skip", "save_steps", "warmup_steps", "top_k", "weight_decay",
                        "max_grad_norm", "adam_epsilon", "num_train_epochs")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}: a negative rate climbs the "
                             "loss, and Adam steps of more than 1 per weight turn a pretrained model into noise that "
                             "still trains with finite numbers. The paper uses 1e-5.")
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(f"max_steps must be a positive number of optimizer steps, or -1 to derive them from "
                             f"num_train_epochs; got {self.max_steps}.")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio is a fraction of the optimizer steps and must be in [0, 1], got "
                             f"{self.warmup_ratio}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        self._check_scheduler()
        if self.num_loss_tokens_to_skip >= self.max_completion_length:
            raise ValueError(f"num_loss_tokens_to_skip={self.num_loss_tokens_to_skip} leaves no completion token "
                             f"in the loss with max_completion_length={self.max_completion_length}.")
        for placeholder in ("{prompt}", "{privileged_context}"):
            if placeholder not in self.teacher_prompt_template:
                raise ValueError(f"teacher_prompt_template must contain {placeholder}; got "
                                 f"{self.teacher_prompt_template!r}.")
        try:  # a stray brace (JSON in the template) would otherwise fail at the first row, after the config
            self.teacher_prompt_template.format(prompt="", privileged_context="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"teacher_prompt_template={self.teacher_prompt_template!r} cannot be filled from "
                             f"{{prompt}} and {{privileged_context}} alone ({type(error).__name__}: {error}); write a "
                             "literal brace as {{ or }}.") from None
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.lora_target_modules.strip(" ,"):
            raise ValueError("lora_target_modules is empty: name the linear layers to adapt (q_proj,v_proj) or "
                             "write all-linear.")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; choose one.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set max_steps > 0 or num_train_epochs > 0.")
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.steps_per_generation < 1 or self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation={self.steps_per_generation} must be a positive multiple of "
                             f"gradient_accumulation_steps={self.gradient_accumulation_steps}, so that a generated "
                             "batch serves whole optimizer steps.")
        completions = self.per_device_train_batch_size * self.steps_per_generation
        if completions % self.num_generations:
            raise ValueError(
                f"Each rank generates per_device_train_batch_size × steps_per_generation = {completions} "
                f"completions per round, which must be a multiple of num_generations={self.num_generations}.")
        if self.compile_generation and self.rollout_path in ("per_layer", "hybrid_engine"):
            raise ValueError(f"compile_generation=True compiles the gathered model's forward, but "
                             f"rollout_path={self.rollout_path!r} generates otherwise; use rollout_path='gather_once' "
                             "or 'auto', or drop compile_generation.")
        choice("report_to", REPORT_TO)
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("report_to='tensorboard' needs the tensorboard package: pip install tensorboard.")
        choice("deepspeed_log_level", LOG_LEVELS)
        for name in ("sample_table_steps", "sample_table_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        # the files the user named are read now, not when the engines are built (the teacher's after the student's)
        if self.deepspeed is not None:
            read_ds_config(self.deepspeed, "student")
        if self.teacher_deepspeed is not None:
            read_ds_config(self.teacher_deepspeed, "teacher")

    def _check_scheduler(self) -> None:
        from transformers import SchedulerType  # here: importing sdft_ds.config stays free of torch

        names = [s.value for s in SchedulerType if s.value not in SCHEDULERS_NEEDING_ARGUMENTS]
        if self.lr_scheduler_type in SCHEDULERS_NEEDING_ARGUMENTS:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r} needs lr_scheduler_kwargs or a metric at "
                             f"each step, which sdft_ds does not pass; choose one of {', '.join(names)}.")
        if self.lr_scheduler_type not in names:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r} is no transformers scheduler; choose one "
                             f"of {', '.join(names)}.")

    @property
    def prompts_per_generation(self) -> int:
        """Prompts each rank draws per generation round (SFT: per optimizer step, each row once)."""
        if self.method == "sft":
            return self.per_device_train_batch_size * self.gradient_accumulation_steps
        return self.per_device_train_batch_size * self.steps_per_generation // self.num_generations

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps served by one round of prompts."""
        if self.method == "sft":
            return 1
        return self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps

    @property
    def reuses_rollouts(self) -> bool:
        return self.method == "sdft" and (self.steps_per_generation > self.gradient_accumulation_steps
                                          or self.num_iterations > 1)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(num_training_steps * self.warmup_ratio)

    def student_ds_config_path(self) -> str | dict:
        return self.deepspeed if self.deepspeed is not None else str(DS_CONFIG_DIR / "zero3_offload.json")

    def teacher_ds_config_path(self, student_stage: int = 3) -> str | dict:
        if self.teacher_deepspeed is not None:
            return self.teacher_deepspeed
        return str(DS_CONFIG_DIR / ("teacher_zero3.json" if student_stage == 3 else "teacher_zero0.json"))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# ---- TRL compatibility ----
# A config written for TRL's SDFTConfig (the field names and values of TRL 1.6 to 1.16) runs unchanged: each TRL name
# or value is mapped to ours here and nowhere else, and each TRL setting that sdft_ds does not implement is refused
# with what to use instead. docs/migrating_from_trl.md lists these tables, and tests/test_trl_compat.py keeps the two
# in step.

TRL_TEACHER_KINDS = {"base": "frozen", "live": "live", "ema": "ema"}  # TRL's teacher_model_kind -> our teacher_mode
TRL_DISTILLATION_MODES = {"full_logits": "full", "topk_logits": "topk", "sampled_token": "sampled_token"}


def _trl_teacher_kind(value):
    if value not in TRL_TEACHER_KINDS:
        raise ValueError(f"teacher_model_kind={value!r} is not valid; choose one of {', '.join(TRL_TEACHER_KINDS)} "
                         "(TRL's names for teacher_mode = frozen, live, ema).")
    return TRL_TEACHER_KINDS[value]


def _trl_distillation_mode(value):
    """TRL's values of distillation_mode (full_logits, topk_logits) to ours; our own pass unchanged."""
    return TRL_DISTILLATION_MODES.get(value, value) if isinstance(value, str) else value


def _trl_gather_for_generation(value):
    """True (TRL's default): gather the weights for generation, which rollout_path='auto' does wherever the model
    fits (no setting of ours). False: generate on the partitioned model, layer by layer."""
    if not isinstance(value, bool):
        raise ValueError(f"ds3_gather_for_generation must be true or false, got {value!r}.")
    return None if value else "per_layer"


# TRL name -> (our name, converter of TRL's value to ours; None from the converter: nothing of ours to set)
TRL_ALIASES: dict[str, tuple[str, typing.Callable]] = {
    "teacher_model_kind": ("teacher_mode", _trl_teacher_kind),
    "distillation_mode": ("distillation_mode", _trl_distillation_mode),  # our name, TRL's values
    "ds3_gather_for_generation": ("rollout_path", _trl_gather_for_generation),
}

_VLLM = ("sdft_ds generates inside its DeepSpeed engines, without vLLM: rollout_path (auto picks gather_once, or "
         "per_layer where the model does not fit) and compile_generation=True (static KV cache, CUDA graphs) are its "
         "fast paths. "
         "Drop use_vllm and the vllm_* fields.")
_NO_EVAL = ("sdft_ds runs no evaluation loop during training; a held-out set's divergence before and after training "
            "is reported with eval_dataset_name (launch/train.py) or SDFTTrainer.heldout_divergence().")

# TRL (or transformers TrainingArguments) field that sdft_ds does not implement -> (values accepted because they ask
# for what sdft_ds does anyway, which include TRL's default so that a dumped TRL config passes; the message for any
# other value, naming what to use instead).
TRL_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "use_vllm": ((False,), _VLLM),
    **{name: ((default,), _VLLM) for name, default in (
        ("vllm_mode", "colocate"), ("vllm_model_impl", "vllm"), ("vllm_enable_sleep_mode", False),
        ("vllm_server_base_url", None), ("vllm_server_host", "0.0.0.0"), ("vllm_server_port", 8000),
        ("vllm_group_port", 51216), ("vllm_server_timeout", 240.0), ("vllm_tensor_parallel_size", 1),
        ("vllm_gpu_memory_utilization", 0.3), ("vllm_max_model_length", None))},
    "use_teacher_server": ((False,), "The teacher is a DeepSpeed engine of the same job (teacher_deepspeed), not a "
                           "vLLM server; teacher_model_kind='live' (teacher_mode='live') makes the current student "
                           "the teacher without a second copy of the weights. Drop use_teacher_server."),
    "generation_batch_size": ((None,), "Set steps_per_generation = generation_batch_size / "
                              "(per_device_train_batch_size × number of ranks) instead; TRL derives the one from the "
                              "other."),
    "num_generations_eval": ((None,), _NO_EVAL),
    "eval_strategy": (("no",), _NO_EVAL),
    "per_device_eval_batch_size": ((8,), _NO_EVAL),
    "shuffle_dataset": ((True,), "sdft_ds always draws the prompts in a seeded random order; change seed for another "
                        "order. Drop shuffle_dataset."),
    "remove_unused_columns": ((False, True), "sdft_ds reads only prompt, teacher_prompt and privileged_context, "
                              "either way."),
    "min_p": ((None,), "sdft_ds samples with temperature, top_p and top_k only; cut the tail with top_p or top_k."),
    "repetition_penalty": ((1.0,), "sdft_ds samples from the student's own distribution (temperature, top_p, "
                           "top_k) and has no repetition penalty; drop it."),
    "generation_kwargs": ((None,), "Sampling is set by temperature, top_p, top_k and max_completion_length; other "
                          "generation arguments are not passed. Drop generation_kwargs."),
    "cache_implementation": ((None,), "Set compile_generation=True for a static KV cache with a compiled decoding "
                             "step."),
    "trust_remote_code": ((False,), "sdft_ds does not load custom model code by name; build the model (and "
                          "ref_model) yourself with trust_remote_code=True and pass the objects, with their tokenizer "
                          "as processing_class."),
    "use_liger_kernel": ((False,), "The divergence is already fused and chunked (divergence_impl='chunked'); "
                         "drop use_liger_kernel."),
    "torch_empty_cache_steps": ((None,), "DeepSpeed manages the device memory; drop torch_empty_cache_steps."),
    "gradient_checkpointing_kwargs": ((None,), "Set gradient_checkpointing=True; its arguments are transformers' "
                                      "defaults."),
    "lr_scheduler_kwargs": ((None,), "Choose an lr_scheduler_type that needs no arguments (linear, cosine, "
                            "constant, constant_with_warmup, ...) with warmup_steps or warmup_ratio."),
    "optim": (("adamw_torch", "adamw_torch_fused"), "The optimizer is the student DeepSpeed config's 'optimizer' "
              "section (deepspeed=...), AdamW in ds_configs/; edit that section instead of optim."),
    "save_strategy": (("steps",), "Checkpoints are written every save_steps optimizer steps (0: none but the final "
                      "export); set save_steps instead of save_strategy."),
}

# TRL 1.16's defaults where they differ from ours (in our names and values): SDFTConfig(**TRL_DEFAULTS, ...) trains
# as TRL's SDFTConfig(...) would. Ours follow the paper (forward KL over the full vocabulary, one completion per
# prompt).
TRL_DEFAULTS = {
    "distillation_mode": "topk", "distillation_alpha": 0.5, "teacher_update_rate": 0.05, "num_generations": 8,
    "per_device_train_batch_size": 8, "gradient_checkpointing": True, "bf16": True, "learning_rate": 5e-5,
    "num_train_epochs": 3.0, "save_steps": 500,
}


def _same_setting(value, accepted) -> bool:
    """`value` asks for the accepted setting: equal, and a bool only where a bool is accepted (False == 0)."""
    if value is None or accepted is None:
        return value is accepted
    return isinstance(value, bool) == isinstance(accepted, bool) and value == accepted


def from_trl(kwargs: dict) -> dict:
    """Keyword arguments of SDFTConfig with TRL's names and values mapped to ours (TRL_ALIASES), TRL's settings that
    sdft_ds does not implement refused (TRL_UNSUPPORTED), and a TRL name and ours that disagree refused."""
    ours = dict(kwargs)
    for trl_name, (name, convert) in TRL_ALIASES.items():
        if trl_name not in ours:
            continue
        value = convert(ours.pop(trl_name))
        if value is None:
            continue
        if name != trl_name and name in ours and ours[name] != value:
            raise ValueError(f"{trl_name}={kwargs[trl_name]!r} (TRL's name, meaning {name}={value!r}) and "
                             f"{name}={ours[name]!r} disagree; set only one of them.")
        ours[name] = value
    for trl_name, (accepted, message) in TRL_UNSUPPORTED.items():
        if trl_name not in ours:
            continue
        value = ours.pop(trl_name)
        if not any(_same_setting(value, a) for a in accepted):
            raise ValueError(f"{trl_name}={value!r} is a TRL setting that sdft_ds does not implement. {message} "
                             "(docs/migrating_from_trl.md)")
    unknown = sorted(set(ours) - {f.name for f in fields(SDFTConfig)})
    if unknown:
        from transformers import TrainingArguments  # here, on this error only: `import sdft_ds` stays free of torch

        borrowed = [name for name in unknown if name in {f.name for f in fields(TrainingArguments)}]
        if borrowed:
            raise ValueError(f"{', '.join(borrowed)}: transformers TrainingArguments field(s) that sdft_ds does not "
                             "implement; drop them (docs/migrating_from_trl.md lists what each TRL setting becomes).")
    return ours


_dataclass_init = SDFTConfig.__init__


@functools.wraps(_dataclass_init)
def _init_accepting_trl(self, *args, **kwargs) -> None:
    _dataclass_init(self, *args, **from_trl(kwargs))


SDFTConfig.__init__ = _init_accepting_trl
