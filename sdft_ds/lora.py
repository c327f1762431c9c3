"""LoRA students (peft): the adapter config, checked against the model's modules before any weight is loaded; the
adapter attached to the student; the teacher as the student's own engine with the adapter disabled (frozen) or with
a second, averaged adapter (ema); the adapter's and the merged model's export.

The adapters are PEFT's own layers injected into the transformers model, so the engine, the fused output head, the
rollout and ZeRO-3's hooks see one ordinary module tree. Only `peft.tuners.lora.Linear` targets are accepted: its
adapter weights live in submodules (lora_A, lora_B) that run as modules, which is what ZeRO-3 needs to gather them.
peft is pinned <0.22 (pyproject) for the names used here: LoraLayer, get_delta_weight, set_adapter(inference_mode),
enable/disable_adapter_layers. It is imported only when a run uses LoRA: `import peft` alone took 7 s per process on
the 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from sdft_ds import engines

STUDENT_ADAPTER = "default"  # peft's name for a model's first adapter
TEACHER_ADAPTER = "teacher"  # the EMA teacher's adapter, beside the student's on the same base weights
INITIALISATIONS = (True, False, "gaussian")  # the ones that leave the base weights (the frozen teacher) untouched


def lora_config(args, peft_config=None):
    """The run's LoraConfig: the trainer's `peft_config`, else one built from SDFTConfig's lora_* fields when
    use_peft; None for full fine-tuning. Settings sdft_ds cannot train correctly are refused by name."""
    if peft_config is None and not args.use_peft:
        if args.save_merged_model:
            raise ValueError("save_merged_model merges a LoRA adapter into the base model, and this run trains the "
                             "whole model (use_peft is off); its export already is the trained model. Drop "
                             "save_merged_model, or set use_peft.")
        return None
    from peft import LoraConfig

    if peft_config is None:
        targets = args.lora_target_modules.strip()
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=targets if targets == "all-linear"
                                 else [t.strip() for t in targets.split(",") if t.strip()],
                                 task_type="CAUSAL_LM")
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"peft_config is a {type(peft_config).__name__}; sdft_ds trains LoRA adapters only "
                         "(peft.LoraConfig).")
    refused = {
        "use_dora": (peft_config.use_dora, "DoRA reads the base weight outside the base layer's forward, where "
                     "ZeRO-3 has not gathered it"),
        "modules_to_save": (peft_config.modules_to_save, "fully trained copies of modules are not adapters; the "
                            "output layer's would also bypass the fused divergence head"),
        "lora_bias": (peft_config.lora_bias, "a trained bias on lora_B is not supported"),
        "init_lora_weights": (peft_config.init_lora_weights not in INITIALISATIONS and peft_config.init_lora_weights,
                              "this initialisation rewrites the base weights, which are also the frozen teacher"),
    }
    for name, (value, why) in refused.items():
        if value:
            raise ValueError(f"LoraConfig.{name}={value!r} is not supported: {why}. Use a plain LoRA adapter "
                             f"(r, lora_alpha, lora_dropout, target_modules).")
    return peft_config


def check_targets(model_config, peft_config) -> int:
    """Refuse target modules that match nothing, or layers the adapter cannot be trained on correctly, on the
    model's skeleton (meta tensors: no weights loaded); returns the number of adapter parameters it will train."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    with engines.unpartitioned_construction(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    output = skeleton.get_output_embeddings()  # before peft puts an adapter layer in its place
    try:
        wrapped = get_peft_model(skeleton, copy.deepcopy(peft_config))
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"LoRA target_modules={peft_config.target_modules!r} match no layer of this "
                         f"{model_config.model_type} model ({error}). Name its linear layers (e.g. q_proj,v_proj) or "
                         "use all-linear.") from None
    for name, module in wrapped.get_base_model().named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if module.get_base_layer() is output:
            raise ValueError(f"LoRA target {name!r} is the output layer: sdft_ds's fused divergence head reads the "
                             "output weight directly, so an adapter there would not be trained. Leave it out of "
                             "target_modules (all-linear already does).")
        if not isinstance(module, LoraLinear):
            raise ValueError(f"LoRA target {name!r} is a {type(module.get_base_layer()).__name__}; sdft_ds adapts "
                             "linear layers only (under ZeRO-3 other adapter layers read weights that are not "
                             "gathered). Name linear layers in target_modules.")
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def attach(lm: nn.Module, peft_config, teacher_adapter: bool = False):
    """`lm` with a LoRA adapter injected (the PeftModel wrapping it; `lm` itself now holds the adapter layers).
    The adapter takes the base weights' dtype (peft would keep it in fp32 under a 16-bit base, and DeepSpeed trains
    one dtype). With `teacher_adapter`, a second adapter starts as a copy of the student's and is never trained."""
    from peft import get_peft_model

    model = get_peft_model(lm, copy.deepcopy(peft_config), autocast_adapter_dtype=False)
    if teacher_adapter:
        model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(peft_config), autocast_adapter_dtype=False)
        with torch.no_grad():
            for teacher, student in adapter_pairs(model.get_base_model()):
                teacher.copy_(student)
        model.set_adapter(STUDENT_ADAPTER)  # the student's adapter trains; the teacher's is frozen
    return model


def adapter_pairs(lm: nn.Module, teacher_lm: nn.Module | None = None) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(teacher, student) adapter parameters, one pair per weight: the teacher adapter beside the student's on
    `lm`, or, with `teacher_lm` (a ref_model of the same architecture with its own adapter), that model's."""
    student = {name: p for name, p in lm.named_parameters() if f".{STUDENT_ADAPTER}." in name and "lora_" in name}
    if teacher_lm is None:
        teacher = dict(lm.named_parameters())
        key = f".{TEACHER_ADAPTER}."
        return [(teacher[name.replace(f".{STUDENT_ADAPTER}.", key)], p) for name, p in student.items()]
    teacher = dict(teacher_lm.named_parameters())
    return [(teacher[name], p) for name, p in student.items()]


class AdapterTeacher:
    """The teacher as the student's own engine: the base model (adapter disabled; frozen) or the EMA adapter
    instead of the student's (ema). No second copy of the base weights; the output weight is the student's.

    Its forward runs the same modules as the student's each step (minus or instead of the student's adapter), so
    ZeRO-3's recorded trace stays the same from step to step, as with a live teacher."""

    def __init__(self, engine, peft_model, adapter: str | None):
        self.engine, self.peft_model, self.adapter = engine, peft_model, adapter

    @property
    def module(self):  # what engines.language_model / output_weight read
        return self.engine.module

    @contextlib.contextmanager
    def active(self):
        """The teacher's adapter in place of the student's for the block (the student's again after it)."""
        tuner = self.peft_model.base_model
        if self.adapter is None:
            tuner.disable_adapter_layers()
        else:
            tuner.set_adapter(self.adapter, inference_mode=True)
        try:
            yield
        finally:
            if self.adapter is None:
                tuner.enable_adapter_layers()
            else:
                tuner.set_adapter(STUDENT_ADAPTER)

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.active():
            return self.engine(*args, **kwargs)


def lora_layers(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in lm.named_modules() if isinstance(module, LoraLayer)]


def adapter_state_dict(peft_model, rank: int) -> dict[str, torch.Tensor]:
    """The student adapter's weights, whole, on rank 0 (empty elsewhere), named as in peft_model.state_dict();
    every rank must call it (one gather of the adapter's parameters, not of the model)."""
    named = [(name, p) for name, p in peft_model.named_parameters()
             if f".{STUDENT_ADAPTER}." in name and "lora_" in name]
    with engines.gathered([p for _, p in named]):
        return {name: p.detach().cpu().clone() for name, p in named} if rank == 0 else {}


def merged_state_dict(engine, rank: int) -> dict[str, torch.Tensor]:
    """The student's weights with its adapter merged in (W + scale·B·A by peft's get_delta_weight, summed in fp32
    and stored in the weights' dtype), named as the base model's; on rank 0, empty elsewhere; every rank must call
    it (the whole model is gathered once, as for a full export, then each adapter layer's own weights)."""
    lm = engines.language_model(engine)
    state = engines.consolidated_state_dict(engine)
    for name, layer in lora_layers(lm):
        adapter = [*layer.lora_A[STUDENT_ADAPTER].parameters(), *layer.lora_B[STUDENT_ADAPTER].parameters()]
        with engines.gathered(adapter):
            delta = layer.get_delta_weight(STUDENT_ADAPTER).float().cpu() if rank == 0 else None
        if rank == 0:
            base = state.pop(f"{name}.base_layer.weight")
            state[f"{name}.weight"] = (base.float() + delta).to(base.dtype)
            if f"{name}.base_layer.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return {k: v for k, v in state.items() if ".lora_" not in k}


def trained_parameters(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
