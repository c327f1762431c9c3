"""Everything that talks to DeepSpeed: process group, configs, engines, gathers, checkpoints, export.

The rest of the package sees engines through this module only, so a DeepSpeed upgrade or a ZeRO-stage swap
touches one file.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
import warnings
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn
from transformers import AutoModelForCausalLM, get_scheduler
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import (HfTrainerDeepSpeedConfig, set_hf_deepspeed_config,
                                                 unset_hf_deepspeed_config)

from sdft_ds.config import read_ds_config  # checked there, before any engine: SDFTConfig reads the files a user names

# DeepSpeed 0.19.8 calls collectives that torch 2.13 deprecates; one warning per step drowns the logs.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                        r"is deprecated", category=FutureWarning)


# ---------------------------------------------------------------- process group

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group, or make a one-rank group for a plain `python script.py`."""
    if not dist.is_initialized():
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        _share_cores()
    return dist.get_rank(), dist.get_world_size()


def _share_cores() -> None:
    """Each rank's OpenMP threads get its share of the node's cores, unless OMP_NUM_THREADS says otherwise.
    By default every rank starts a thread per core, and ranks then spin against each other: measured on 2 cores
    with 2 ranks, each small matmul took 2.8 ms instead of 23 µs and generation ran 4× slower."""
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if "OMP_NUM_THREADS" not in os.environ and local_ranks > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def synchronize() -> None:
    """Wait for the accelerator's queued work (timing boundaries); nothing to wait for on CPU."""
    get_accelerator().synchronize()


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def side_group(timeout_s: float):
    """A CPU (gloo) group of all ranks whose collectives fail after `timeout_s` instead of waiting for ever, for
    decisions that must still be exchanged when some ranks may be stuck elsewhere. Every rank must call it."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def forget_hf_config() -> None:
    """Stop transformers from building later models under ZeRO-3: while a config is registered, `from_pretrained`
    in the same process returns a partitioned, seemingly empty model."""
    unset_hf_deepspeed_config()
    _registered.clear()


def shutdown() -> None:
    """At the end of a process: forget the ZeRO-3 config and leave the process group (PyTorch asks for it; an
    implicit teardown at exit can abort a run that has finished). DeepSpeed caches its groups, so no engine can
    be built in this process afterwards."""
    forget_hf_config()
    if dist.is_initialized():
        dist.destroy_process_group()


def release_group(group) -> None:
    """Tear a side group down as soon as it has served: a gloo group left to interpreter exit can abort the
    process ("terminate called without an active exception", seen once in CI after a successful run)."""
    dist.destroy_process_group(group)


def all_reduce_min(value: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def max_over_ranks(value: float) -> float:
    """One small all-reduce, so that every rank takes the same branch."""
    return -float(all_reduce_min(torch.tensor([-float(value)], device=device())))


# ---------------------------------------------------------------- configs

def fill_ds_config(source: str | dict, args, world_size: int, hidden_size: int,
                   num_training_steps: int) -> HfTrainerDeepSpeedConfig:
    """Fill `"auto"` from SDFTConfig the way the Hugging Face Trainer does, refusing contradictions.

    Returns the live HfDeepSpeedConfig object: while it is the registered one, `from_pretrained` builds models
    already partitioned (zero.Init).
    """
    config = read_ds_config(source)
    hf_args = SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        learning_rate=args.learning_rate, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon, weight_decay=args.weight_decay, save_on_each_node=args.save_on_each_node,
        fp16=args.fp16, bf16=args.bf16, fp16_full_eval=False, bf16_full_eval=False,
        get_warmup_steps=args.get_warmup_steps)
    hf_config = HfTrainerDeepSpeedConfig(config)
    hf_config.trainer_config_process(hf_args)
    hf_config.trainer_config_finalize(hf_args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size)),
                                      num_training_steps)
    return hf_config


def check_accelerator(args) -> None:
    """Refuse what this machine's accelerator cannot train, before any model is loaded (DeepSpeed refuses it only
    when it builds the engine): a precision it lacks, the hybrid engine where it cannot run. Not in
    SDFTConfig: a config may be written on a machine other than the one that trains."""
    accelerator = get_accelerator()
    for name, supported in (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported)):
        if getattr(args, name) and not supported():
            raise ValueError(f"{name}=True, but DeepSpeed cannot train in {name} on this machine's accelerator "
                             f"({accelerator.device_name()}). Drop {name} (float32), or choose "
                             f"{'bf16' if name == 'fp16' else 'fp16'} where it is supported.")
    student = read_ds_config(args.student_ds_config_path(), "student")
    if (student.get("hybrid_engine") or {}).get("enabled") and (incompatible := hybrid_engine_incompatibility()):
        raise ValueError(f"The student DeepSpeed config enables `hybrid_engine`, but {incompatible}. Remove its "
                         "`hybrid_engine` section (e.g. use ds_configs/zero3_offload.json): rollout_path='auto' then "
                         "gathers the model once per rollout.")


def zero_stage(hf_config: HfDeepSpeedConfig) -> int:
    return int(hf_config.get_value("zero_optimization.stage", 0))


def model_dtype(hf_config: HfDeepSpeedConfig) -> torch.dtype:
    if hf_config.is_true("bf16.enabled"):
        return torch.bfloat16
    if hf_config.is_true("fp16.enabled"):
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------- models

def default_attn_implementation() -> str:
    from transformers.utils import is_flash_attn_2_available

    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


_registered: list[HfDeepSpeedConfig] = []


def register_hf_config(hf_config: HfDeepSpeedConfig) -> None:
    """Make `hf_config` the DeepSpeed config transformers consults (`is_deepspeed_zero3_enabled`: models built
    while a ZeRO-3 config is registered are built partitioned under zero.Init). transformers keeps it only by weak
    reference, so it is kept alive here: dropped, ZeRO-3 model construction silently builds whole models."""
    set_hf_deepspeed_config(hf_config)
    _registered[:] = [hf_config]


@contextlib.contextmanager
def unpartitioned_construction():
    """Models built in the block are built whole (e.g. a meta-device skeleton), whatever ZeRO-3 config is
    registered; the registration is restored after."""
    saved = list(_registered)
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved:
            register_hf_config(saved[0])


def load_causal_lm(model, hf_config: HfDeepSpeedConfig, init_kwargs: dict | None,
                   attn_implementation: str | None) -> nn.Module:
    """A model object is used as given; a path or name is loaded already partitioned under `hf_config`."""
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a PreTrainedModel or a checkpoint path/name, got {type(model).__name__}.")
    kwargs = {"dtype": model_dtype(hf_config),
              "attn_implementation": attn_implementation or default_attn_implementation(), **(init_kwargs or {})}
    register_hf_config(hf_config)
    return AutoModelForCausalLM.from_pretrained(str(model), **kwargs)


def causal_lm_from_config(config, hf_config: HfDeepSpeedConfig, attn_implementation: str | None) -> nn.Module:
    """A new model of `config`'s architecture, built partitioned under `hf_config` (its weights are copied in
    afterwards, e.g. a teacher made from the student)."""
    register_hf_config(hf_config)
    return AutoModelForCausalLM.from_config(config, dtype=model_dtype(hf_config),
                                            attn_implementation=attn_implementation or default_attn_implementation())


class OutputHead(nn.Module):
    """Runs a function of (hidden states, output weight) inside a module of its own.

    The output weight is registered with ZeRO-3 as this module's external parameter: DeepSpeed gathers it for
    this module's forward and again for its backward, and its gradient lands in the partitioned parameter,
    tied to the input embedding or not. Calling the loss outside a module leaves an untied weight
    partitioned when autograd accumulates its gradient (measured: a shape error).
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self._weight = [weight]  # a list, so the weight is not registered twice as a parameter

    @property
    def weight(self) -> nn.Parameter:
        return self._weight[0]

    def forward(self, hidden: torch.Tensor, fn, kwargs: dict):
        return tuple(fn(hidden, self.weight, **kwargs))


class Policy(nn.Module):
    """The causal LM plus an output head, so that one engine forward runs decoder, head and loss."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = OutputHead(lm.get_output_embeddings().weight)
        deepspeed.zero.register_external_parameter(self.head, self.head.weight)

    @property
    def config(self):
        return self.lm.config

    def generate(self, *args, **kwargs):
        """The hybrid engine swaps this for its kernel-backed generate; rollouts call it through the engine."""
        return self.lm.generate(*args, **kwargs)

    def forward(self, input_ids, attention_mask, start: int, length: int, token_mask=None, head_fn=None,
                head_kwargs=None):
        """Hidden states predicting tokens [start, start + length) — or `head_fn` applied to the masked ones."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as in generate
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids).last_hidden_state
        hidden = hidden[:, start - 1:start - 1 + length]  # (B, L, H)
        if head_fn is None:
            return hidden
        return self.head(hidden[token_mask], head_fn, head_kwargs or {})


def output_weight(engine) -> nn.Parameter:
    return engine.module.head.weight


def language_model(engine) -> nn.Module:
    return engine.module.lm


def build_student_engine(lm: nn.Module, hf_config: HfTrainerDeepSpeedConfig, args, num_training_steps: int):
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    policy = Policy(lm)

    def scheduler(optimizer):
        return get_scheduler(args.lr_scheduler_type, optimizer,
                             num_warmup_steps=args.get_warmup_steps(num_training_steps),
                             num_training_steps=num_training_steps)
    if dist.get_rank() == 0:  # the first engine on a machine sits silent while DeepSpeed compiles its ops
        print("building the student engine (the first run on a machine compiles DeepSpeed's ops: about a minute)",
              flush=True)
    engine, *_ = deepspeed.initialize(model=policy, config=hf_config.config,
                                      model_parameters=[p for p in policy.parameters() if p.requires_grad],
                                      lr_scheduler=None if "scheduler" in hf_config.config else scheduler)
    engine.train()
    return engine


def build_teacher_engine(lm: nn.Module, hf_config: HfTrainerDeepSpeedConfig):
    """An inference-only engine: no optimizer, no gradients, eval mode."""
    lm.requires_grad_(False)
    lm.config.use_cache = False
    engine, *_ = deepspeed.initialize(model=Policy(lm), config=hf_config.config)
    engine.eval()
    return engine


def architecture(engine) -> tuple:
    """What EMA needs to be equal: parameter names and full shapes."""
    return tuple((name, tuple(getattr(p, "ds_shape", p.shape)))
                 for name, p in language_model(engine).named_parameters())


def numel(engine) -> tuple[int, int]:
    """(parameters held on this rank, parameters of the whole model)."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return local, total


def hybrid_engine_incompatibility() -> str | None:
    """Why DeepSpeed's hybrid engine cannot run models of the installed transformers, or None."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        # Measured, not assumed: benchmarks/results/gpu_h200.md (the hybrid-engine check on an H200).
        return ("DeepSpeed 0.19's hybrid engine does not run transformers 5 models: its inference containers expect "
                "transformers 4's decoder-layer calls (a Llama failed in ds_transformer.forward on an H200 with "
                "\"'tuple' object has no attribute 'size'\")")
    return None


def hybrid_engine_enabled(engine) -> bool:
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

    return isinstance(engine, DeepSpeedHybridEngine)


def fits_gathered(engine, headroom: float = 1.5) -> bool:
    """Whether one full copy of the model (times `headroom` for the KV cache and activations) fits in free
    device memory on every rank — the gather-once rollout needs it on all ranks at once. Decided together (one
    all-reduce): ranks near the limit must not take different paths, whose collectives would not pair."""
    _, total = numel(engine)
    element_size = next(engine.module.parameters()).element_size()
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max_over_ranks(float(total * element_size * headroom >= free)) == 0.0


# ---------------------------------------------------------------- gathers

def gathered(params, modifier_rank: int | None = None):
    """Full copies of ZeRO-3 parameters for the duration of a `with` block (a no-op when not partitioned)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def partitioned(engine) -> bool:
    return engine.zero_optimization_partition_weights()


# ZeRO-3 internals used below (DeepSpeed 0.19, pinned <0.20 in pyproject for them): the module hooks kept by
# DeepSpeedZeRoOffload (forward_hooks, backward_hooks, fwd_pre_hook) and the F.linear that zero.Init installs
# process-wide (original kept as InsertPostInitMethodToModuleSubClasses.linear_bk).

def _zero3_offload(engine):
    """The object that owns the engine's ZeRO-3 module hooks (training engine or inference-only engine)."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


@contextlib.contextmanager
def _hooks_suspended(offload):
    """ZeRO-3's module hooks taken out of the modules' hook dictionaries and put back in their places.

    Unlike removing and re-registering them (DeepSpeed's own `unwrap_model_for_generation`, TRL), the modules
    keep their ids, so the parameter coordinator's recorded trace of the training step stays valid: nothing
    the model runs meanwhile is recorded into it, and nothing has to be re-recorded afterwards."""
    handles = [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]
    saved = {}
    for handle in handles:
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            saved.setdefault(id(hooks), (hooks, dict(hooks)))
            del hooks[handle.id]
    try:
        yield
    finally:
        for hooks, before in saved.values():
            added = {key: hook for key, hook in hooks.items() if key not in before}
            hooks.clear()
            hooks.update(before)
            hooks.update(added)


@contextlib.contextmanager
def torch_linear():
    """torch's own F.linear for the block. zero.Init's replacement (memory_efficient_linear) only pays off when
    autograd would keep gathered weights alive until backward; without autograd it is a Python
    autograd.Function per matmul, measured ~3x slower for decode-sized matmuls on CPU."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    if torch.nn.functional.linear is not zero3_linear_wrap:
        yield
        return
    torch.nn.functional.linear = InsertPostInitMethodToModuleSubClasses.linear_bk
    try:
        yield
    finally:
        torch.nn.functional.linear = zero3_linear_wrap


@contextlib.contextmanager
def whole_model(engine):
    """The engine's model as a plain module for inference: every ZeRO-3 parameter gathered once on entry (an
    all-gather per partitioned parameter, none while decoding), ZeRO-3's hooks suspended, so running it fetches nothing and records nothing; re-partitioned
    and hooks restored on exit, exceptions included. A model that ZeRO does not partition is used as it is."""
    if not partitioned(engine):
        yield
        return
    with torch.no_grad(), gathered(list(engine.module.parameters())), _hooks_suspended(_zero3_offload(engine)), \
            torch_linear():
        yield


@contextlib.contextmanager
def hooked_inference(engine):
    """Inference through ZeRO-3's hooks (per-layer gathers). Each decoding forward is a step for the parameter
    coordinator: it either records a forward-only trace (when the coordinator is recording) or replays the prefix
    of the training trace and prefetches past it. Forget the trace afterwards, so the next training step records
    its own (measured: one recording step after each per-layer rollout) instead of replaying a decoding trace."""
    try:
        yield
    finally:
        if partitioned(engine):
            coordinator = _zero3_offload(engine).get_param_coordinator()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()


def full_copy(param: nn.Parameter) -> torch.Tensor:
    """A detached full copy of a (possibly partitioned) parameter; every rank must call it."""
    if not hasattr(param, "ds_id"):
        return param.detach()
    with gathered([param]):
        return param.data.clone()


def _piece(param) -> tuple[torch.Tensor, int]:
    """The writable piece of a parameter this rank holds, flattened, and its offset in the flattened full
    tensor: the ZeRO-3 partition (padding cut off), or all of a parameter that is not partitioned."""
    if not hasattr(param, "ds_tensor"):
        return param.data.view(-1), 0
    size = param.ds_tensor.numel()
    offset = dist.get_rank(group=param.ds_process_group) * size
    return param.ds_tensor.data.view(-1)[:max(0, min(size, param.ds_numel - offset))], offset


def _refresh_full(param) -> None:
    """A ZeRO-3 parameter held whole (persistent) after its partition was written: rebuild it from the
    partitions. The same parameters are whole on every rank, so every rank makes the same calls."""
    if not hasattr(param, "ds_tensor") or param.ds_status != ZeroParamStatus.AVAILABLE:
        return
    part = param.ds_tensor.data.view(-1).to(device())
    whole = part.new_empty(part.numel() * dist.get_world_size(group=param.ds_process_group))
    dist.all_gather_into_tensor(whole, part, group=param.ds_process_group)
    param.data.view(-1).copy_(whole[:param.ds_numel])


def parameter_pairs(teacher_engine, student_engine) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(teacher, student) parameters of two models of one architecture, in order."""
    return list(zip(language_model(teacher_engine).parameters(), language_model(student_engine).parameters()))


class TeacherEMA:
    """θ_T ← (1 − r)·θ_T + r·θ_S over (teacher, student) parameter pairs (the whole models, or a LoRA teacher
    adapter and the student's), each rank on the ZeRO-3 partition of θ_T it holds.

    Parameters of one shape are partitioned alike, so each rank's teacher partition meets the
    student partition of the same elements and nothing is gathered; only the small parameters ZeRO-3 keeps whole
    (persistent) are re-assembled with one all-gather each (a student laid out otherwise, e.g. under ZeRO-2, is
    read whole or gathered one parameter at a time). With a 16-bit teacher the average is kept in an fp32 copy
    of those partitions: r·(θ_S − θ_T) at r = 0.01 is far below bf16's resolution (2^-8 relative), so averaging
    in bf16 would leave the teacher frozen."""

    def __init__(self, pairs: list[tuple[nn.Parameter, nn.Parameter]], fp32_shadow: bool = True):
        self.pairs = pairs
        self.shadows = [_piece(t)[0].float() if fp32_shadow and t.dtype != torch.float32 else None
                        for t, _ in self.pairs]

    @staticmethod
    def _student_values(student_param, teacher_param, offset: int, count: int) -> torch.Tensor:
        """The student's values at elements [offset, offset + count) of the teacher's piece; decided by layout
        alone, so every rank gathers the same parameters or none."""
        if not hasattr(student_param, "ds_tensor"):  # whole on every rank
            return student_param.data.view(-1)[offset:offset + count]
        if hasattr(teacher_param, "ds_tensor") and student_param.ds_tensor.numel() == teacher_param.ds_tensor.numel():
            return _piece(student_param)[0]  # ZeRO-3 partitions both alike: the same elements
        with gathered([student_param]):
            return student_param.data.view(-1)[offset:offset + count].clone()

    @torch.no_grad()
    def update(self, rate: float) -> None:
        for (teacher_param, student_param), shadow in zip(self.pairs, self.shadows):
            piece, offset = _piece(teacher_param)
            target = piece if shadow is None else shadow
            source = self._student_values(student_param, teacher_param, offset, piece.numel())
            target.lerp_(source.to(target.device, target.dtype), rate)
            if shadow is not None:
                piece.copy_(shadow)
            _refresh_full(teacher_param)

    def state_dict(self) -> dict:
        """This rank's teacher partitions and fp32 copies: what a resumed run needs to continue the average."""
        return {"pieces": [_piece(t)[0].cpu().clone() for t, _ in self.pairs],
                "shadows": [None if s is None else s.cpu().clone() for s in self.shadows]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for (teacher_param, _), shadow, piece, saved_shadow in zip(self.pairs, self.shadows, state["pieces"],
                                                                   state["shadows"]):
            _piece(teacher_param)[0].copy_(piece)
            _refresh_full(teacher_param)
            if shadow is not None:
                shadow.copy_(saved_shadow)


def copy_weights(teacher_engine, student_engine) -> None:
    """The teacher becomes a copy of the student (a teacher made from the student's checkpoint)."""
    TeacherEMA(parameter_pairs(teacher_engine, student_engine), fp32_shadow=False).update(1.0)


# ---------------------------------------------------------------- checkpoints and export

def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full 16-bit state dict of the LM on rank 0 (empty on other ranks); every rank must call it."""
    if partitioned(engine):
        state = engine._zero3_consolidated_16bit_state_dict()
    else:  # copies, as ZeRO-3's are: the live tensors change with the next optimizer step
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()} if dist.get_rank() == 0 else {}
    return {k.removeprefix("lm."): v for k, v in (state or {}).items() if k.startswith("lm.")}


def save_checkpoint(engine, directory: str, tag: str, trained_only: bool = False) -> None:
    """`trained_only` (LoRA): the frozen base weights stay out of the checkpoint (a resumed run loads them from
    the model again), so each checkpoint holds the adapter, not another copy of the model."""
    engine.save_checkpoint(directory, tag=tag, exclude_frozen_parameters=trained_only)


def load_checkpoint(engine, directory: str, tag: str, trained_only: bool = False) -> None:
    """Weights, optimizer and scheduler state of a training engine (the trained weights only, when the
    checkpoint was saved so: the others keep the values they were built with)."""
    path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                     load_module_strict=not trained_only)
    if path is None:
        raise FileNotFoundError(f"No DeepSpeed checkpoint found in {directory!r} (tag {tag!r}).")


def optimizer_step(engine) -> bool:
    """`engine.step()` after a micro-batch's backward; at the accumulation boundary, whether the optimizer changed
    the weights. A step whose gradients are not finite is skipped on every rank: DeepSpeed's ZeRO and 16-bit
    optimizers do it themselves (an invalid global norm counts as an overflow; pinned 0.19: stage3.step,
    stage_1_and_2.step, bf16_optimizer.step). A plain fp32 engine (ZeRO-0) would apply it and poison Adam's
    moments, so there the step runs on zeroed gradients at learning rate 0 (the weights stay bit for bit) and the
    optimizer and scheduler states are put back. Gradients are all-reduced at the boundary: ranks decide alike."""
    boundary = engine.is_gradient_accumulation_boundary()
    plain = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None] if boundary and plain else []
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        engine.step()
        return boundary and engine.was_step_applied()
    optimizer_state = copy.deepcopy(engine.optimizer.state_dict())  # learning rates included
    scheduler_state = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    for grad in grads:
        grad.zero_()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.step()
    engine.optimizer.load_state_dict(optimizer_state)
    if scheduler_state is not None:
        engine.lr_scheduler.load_state_dict(scheduler_state)
    return False


def nonfinite_parameter(engine) -> str | None:
    """The name of a parameter whose part on this rank holds NaN or inf, or None."""
    for name, p in language_model(engine).named_parameters():
        if not bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p.data).all()):
            return name
    return None


def range_over_ranks(value: float) -> tuple[float, float]:
    """(smallest, largest) `value` over the ranks; equal when every rank holds the same."""
    return -max_over_ranks(-value), max_over_ranks(value)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on one (one small all-reduce)."""
    return max_over_ranks(float(flag)) > 0


def learning_rate(engine) -> float:
    return engine.get_lr()[0]
