"""A config and a dataset written for TRL's SDFTTrainer (1.16) run unchanged: TRL's names and values map to ours, the
TRL settings sdft_ds does not implement are refused by name with what to use instead, and docs/migrating_from_trl.md
lists every one of them."""

import dataclasses
import re
from pathlib import Path

import pytest
from datasets import Dataset

from sdft_ds import SDFTConfig
from sdft_ds.assets import model_dir
from sdft_ds.config import TRL_ALIASES, TRL_DEFAULTS, TRL_UNSUPPORTED
from sdft_ds.data import teacher_prompt, with_teacher_prompts

DOCS = Path(__file__).resolve().parent.parent / "docs" / "migrating_from_trl.md"

# TRL 1.16's SDFTConfig fields beyond transformers' TrainingArguments, at their defaults: what a TRL script or a dumped
# TRL config holds (read from trl/experimental/sdft/sdft_config.py of TRL 1.16.0).
TRL_116_FIELDS = {
    "model_init_kwargs": None, "trust_remote_code": False, "disable_dropout": True,
    "max_prompt_length": 512, "num_generations": 8, "num_generations_eval": None, "max_completion_length": 256,
    "ds3_gather_for_generation": True, "shuffle_dataset": True, "generation_batch_size": None,
    "steps_per_generation": None, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None,
    "generation_kwargs": None, "chat_template_kwargs": None, "repetition_penalty": 1.0, "cache_implementation": None,
    "use_vllm": False, "use_teacher_server": False, "vllm_mode": "colocate", "vllm_model_impl": "vllm",
    "vllm_enable_sleep_mode": False, "vllm_server_base_url": None, "vllm_server_host": "0.0.0.0",
    "vllm_server_port": 8000, "vllm_group_port": 51216, "vllm_server_timeout": 240.0, "vllm_tensor_parallel_size": 1,
    "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": None, "num_iterations": 1,
    "teacher_model_kind": "base", "teacher_update_rate": 0.05, "teacher_sync_steps": 1, "distillation_alpha": 0.5,
    "distillation_mode": "topk_logits", "distillation_topk": 100, "distillation_is_clip": 2.0,
    "distillation_add_tail": False, "generate_from_teacher": False,
    "teacher_prompt_template": "{prompt}\n\n{privileged_context}", "num_loss_tokens_to_skip": 0,
}
# the TrainingArguments defaults that TRL's SDFTConfig (and its base config) change
TRL_116_BASE_FIELDS = {"remove_unused_columns": False, "logging_steps": 10, "gradient_checkpointing": True,
                       "bf16": None, "lr_scheduler_kwargs": None, "use_liger_kernel": False,
                       "torch_empty_cache_steps": None}


def test_every_trl_field_is_ours_mapped_or_refused():
    own = {f.name for f in dataclasses.fields(SDFTConfig)}
    for name in {**TRL_116_FIELDS, **TRL_116_BASE_FIELDS}:
        assert name in own or name in TRL_ALIASES or name in TRL_UNSUPPORTED, name
    assert set(TRL_UNSUPPORTED).isdisjoint(own)  # a refused name never shadows a field of ours


def test_installed_trl_has_the_fields_listed_here():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"TRL {trl.__version__} installed; the list above is 1.16.0's")
    from transformers import TrainingArguments
    from trl.experimental.sdft import SDFTConfig as TRLConfig

    borrowed = {f.name for f in dataclasses.fields(TrainingArguments)}
    theirs = {f.name: f.default for f in dataclasses.fields(TRLConfig) if f.name not in borrowed}
    assert theirs == TRL_116_FIELDS
    for name, default in TRL_116_BASE_FIELDS.items():
        assert next(f.default for f in dataclasses.fields(TRLConfig) if f.name == name) == default, name


def test_a_trl_config_at_trl_defaults_is_accepted_and_mapped():
    # TRL's num_generations=8 needs 8 completions per generation round; TRL's per_device_train_batch_size is 8
    config = SDFTConfig(**TRL_116_FIELDS, per_device_train_batch_size=8)
    assert (config.teacher_mode, config.distillation_mode, config.rollout_path) == ("frozen", "topk", "auto")
    assert (config.distillation_alpha, config.teacher_update_rate, config.distillation_topk) == (0.5, 0.05, 100)


@pytest.mark.parametrize("kind, mode", [("base", "frozen"), ("live", "live"), ("ema", "ema")])
def test_teacher_model_kind_maps_to_teacher_mode(kind, mode):
    assert SDFTConfig(teacher_model_kind=kind).teacher_mode == mode
    assert SDFTConfig(teacher_model_kind=kind, teacher_mode=mode).teacher_mode == mode  # both, agreeing


@pytest.mark.parametrize("trl_mode, mode, alpha", [("full_logits", "full", 0.0), ("topk_logits", "topk", 0.5),
                                                   ("sampled_token", "sampled_token", 1.0)])
def test_trl_distillation_modes_map_to_ours(trl_mode, mode, alpha):
    assert SDFTConfig(distillation_mode=trl_mode, distillation_alpha=alpha).distillation_mode == mode
    assert SDFTConfig(distillation_mode=mode, distillation_alpha=alpha).distillation_mode == mode  # ours unchanged


def test_ds3_gather_for_generation_false_generates_layer_by_layer():
    assert SDFTConfig(ds3_gather_for_generation=False).rollout_path == "per_layer"
    assert SDFTConfig(ds3_gather_for_generation=True, rollout_path="gather_once").rollout_path == "gather_once"


@pytest.mark.parametrize("kwargs, message", [
    (dict(teacher_model_kind="ema", teacher_mode="frozen"),
     r"teacher_model_kind='ema' \(TRL's name, meaning teacher_mode='ema'\) and teacher_mode='frozen' disagree"),
    (dict(ds3_gather_for_generation=False, rollout_path="gather_once"), "disagree; set only one of them"),
    (dict(teacher_model_kind="student"), "teacher_model_kind='student' is not valid; choose one of base, live, ema"),
    (dict(distillation_mode="logits"), "distillation_mode='logits' is not valid"),
    (dict(distillation_mode="sampled_token"), "set distillation_alpha=1.0"),
    (dict(teacher_prompt_template="{prompt}\n\n{privileged_context}\n{answer}"),
     r"cannot be filled from \{prompt\} and \{privileged_context\} alone \(KeyError: 'answer'\)"),
])
def test_conflicting_or_invalid_trl_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig(**kwargs)


REFUSED_VALUES = {  # a value of each refused field that asks for something sdft_ds does not do
    "use_vllm": True, "vllm_mode": "server", "vllm_model_impl": "transformers", "vllm_enable_sleep_mode": True,
    "vllm_server_base_url": "http://localhost:8000", "vllm_server_host": "127.0.0.1", "vllm_server_port": 8001,
    "vllm_group_port": 51217, "vllm_server_timeout": 60.0, "vllm_tensor_parallel_size": 2,
    "vllm_gpu_memory_utilization": 0.5, "vllm_max_model_length": 4096, "use_teacher_server": True,
    "generation_batch_size": 16, "num_generations_eval": 2, "eval_strategy": "steps", "per_device_eval_batch_size": 4,
    "shuffle_dataset": False, "min_p": 0.05, "repetition_penalty": 1.1, "generation_kwargs": {"num_beams": 2},
    "cache_implementation": "static", "trust_remote_code": True, "use_liger_kernel": True,
    "torch_empty_cache_steps": 10, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "lr_scheduler_kwargs": {"num_cycles": 2}, "optim": "sgd", "save_strategy": "epoch",
}
# what each message must name as the way instead
INSTEAD = {"use_teacher_server": "teacher_mode='live'", "generation_batch_size": "steps_per_generation",
           "num_generations_eval": "eval_dataset_name", "eval_strategy": "eval_dataset_name",
           "per_device_eval_batch_size": "eval_dataset_name", "shuffle_dataset": "seed", "min_p": "top_p",
           "repetition_penalty": "drop it", "generation_kwargs": "temperature, top_p, top_k",
           "cache_implementation": "compile_generation=True", "trust_remote_code": "pass the objects",
           "use_liger_kernel": "divergence_impl='chunked'", "torch_empty_cache_steps": "drop",
           "gradient_checkpointing_kwargs": "gradient_checkpointing=True", "lr_scheduler_kwargs": "lr_scheduler_type",
           "optim": "'optimizer'", "save_strategy": "save_steps"}


@pytest.mark.parametrize("name", sorted(TRL_UNSUPPORTED))
def test_each_refused_trl_field_names_what_to_use_instead(name):
    accepted, message = TRL_UNSUPPORTED[name]
    for value in accepted:  # TRL's default asks for nothing sdft_ds does not do: a dumped TRL config passes
        SDFTConfig(**{name: value})
    if name == "remove_unused_columns":  # both values mean the same here
        assert set(accepted) == {False, True}
        return
    value = REFUSED_VALUES[name]
    with pytest.raises(ValueError) as refused:
        SDFTConfig(**{name: value})
    text = str(refused.value)
    assert text.startswith(f"{name}={value!r} is a TRL setting that sdft_ds does not implement. {message}")
    instead = "rollout_path" if name == "use_vllm" or name.startswith("vllm_") else INSTEAD[name]
    assert instead in text and "docs/migrating_from_trl.md" in text


def test_other_trainingarguments_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="logging_first_step: transformers TrainingArguments field"):
        SDFTConfig(logging_first_step=True)
    with pytest.raises(TypeError, match="learnig_rate"):  # a typo stays Python's error
        SDFTConfig(learnig_rate=1e-5)


def test_trl_defaults_reproduce_trl():
    config = SDFTConfig(**TRL_DEFAULTS)
    trl = SDFTConfig(**TRL_116_FIELDS, **{k: v for k, v in TRL_116_BASE_FIELDS.items() if v is not None},
                     per_device_train_batch_size=8, bf16=True, learning_rate=5e-5, num_train_epochs=3.0,
                     save_steps=500)
    assert dataclasses.asdict(config) == dataclasses.asdict(trl)


# ---- TRL's dataset shape: prompt + privileged_context through teacher_prompt_template

TEMPLATE = "{prompt}\n\nExample answer:\n{privileged_context}\n\nNow answer."


def test_teacher_prompt_from_text():
    assert teacher_prompt("Add 2 and 3.", "5", TEMPLATE) == "Add 2 and 3.\n\nExample answer:\n5\n\nNow answer."


def test_teacher_prompt_from_a_conversation_and_a_context_in_messages():
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Add"}, {"type": "image"},
                                           {"type": "text", "text": "2 and 3."}]}]
    context = [{"role": "assistant", "content": "2 + 3"}, {"role": "assistant", "content": ""},
               {"role": "assistant", "content": "= 5"}]
    assert teacher_prompt(prompt, context, TEMPLATE) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3.\n\nExample answer:\n2 + 3\n= 5\n\nNow answer."}]


def test_a_dataset_in_trls_shape_gets_teacher_prompts_and_a_missing_context_names_its_row():
    rows = Dataset.from_dict({"prompt": ["Add 2 and 3.", "Add 4 and 4."], "privileged_context": ["5", "8"]})
    built = with_teacher_prompts(rows, TEMPLATE)
    assert built["teacher_prompt"][1] == "Add 4 and 4.\n\nExample answer:\n8\n\nNow answer."
    with pytest.raises(ValueError, match=r"Row 1: privileged_context is missing \(None\)"):
        with_teacher_prompts(Dataset.from_dict({"prompt": ["a", "b"], "privileged_context": ["x", None]}), TEMPLATE)


# ---- a TRL-style config and dataset train

def test_a_trl_style_config_and_dataset_train(tmp_path, in_process):
    import json

    from transformers import AutoTokenizer

    from sdft_ds import SDFTTrainer
    from sdft_ds.assets import DEMO_TRAIN_CHAT, TOKENIZER_DIR, model_dir

    rows = [json.loads(line) for line in DEMO_TRAIN_CHAT.read_text().splitlines()[:8]]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "privileged_context": r["privileged_context"]}
                                 for r in rows])  # TRL's shape: no teacher_prompt column
    args = SDFTConfig(  # written with TRL 1.16's names and values
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=4, logging_steps=1, learning_rate=1e-4, teacher_model_kind="ema",
        teacher_update_rate=0.05, distillation_mode="topk_logits", distillation_topk=16, distillation_alpha=0.5,
        teacher_prompt_template="{prompt}\n\nExample answer:\n{privileged_context}", gradient_checkpointing=True,
        use_vllm=False, vllm_mode="colocate", use_teacher_server=False, ds3_gather_for_generation=True,
        shuffle_dataset=True, remove_unused_columns=False, generation_batch_size=None, trust_remote_code=False)
    trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args,
                          processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=dataset)
    metrics = trainer.train()
    assert trainer.step == 2 and trainer.teacher_syncs == 2
    assert all(v == v for v in metrics.values() if isinstance(v, float))  # finite, not NaN
    assert metrics["loss"] > 0


# ---- the migration page lists every mapping and refusal

def _table_names(text: str) -> set[str]:
    """The `names` in the first cell of each Markdown table row."""
    return {name for line in text.splitlines() if line.startswith("|")
            for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])}


def test_a_recipe_in_trls_names_is_mapped_or_refused_like_the_config(tmp_path):
    from sdft_ds.cli import parse_args

    recipe = tmp_path / "trl.yaml"
    required = "model_name_or_path: m\ndataset_name: d.jsonl\n"
    recipe.write_text(required + "teacher_model_kind: base\ndistillation_mode: topk_logits\nuse_vllm: false\n")
    _, config = parse_args(["--config", str(recipe)])
    assert (config.teacher_mode, config.distillation_mode) == ("frozen", "topk")
    recipe.write_text(required + "use_vllm: true\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(recipe)])


def test_trls_trainer_arguments_are_refused_by_name_before_any_engine():
    from sdft_ds import SDFTTrainer

    with pytest.raises(TypeError):  # TRL passes args second: never taken as the teacher
        SDFTTrainer("model", SDFTConfig())
    for name, value in (("eval_dataset", [{"prompt": "x"}]), ("callbacks", []), ("optimizers", ("adam", None))):
        with pytest.raises(ValueError, match=f"does not take TRL's {name}"):
            SDFTTrainer("model", args=SDFTConfig(), train_dataset=[{"prompt": "x"}], **{name: value})
    with pytest.raises(ValueError, match="peft_config is a dict; sdft_ds trains LoRA adapters only"):
        SDFTTrainer(str(model_dir("tiny-qwen2-student")), args=SDFTConfig(), train_dataset=[{"prompt": "x"}],
                    peft_config={"r": 8})


def test_migration_page_lists_every_alias_refusal_and_default_difference():
    text = DOCS.read_text()
    names = _table_names(text)
    missing = sorted((set(TRL_ALIASES) | set(TRL_UNSUPPORTED) | set(TRL_DEFAULTS)) - names)
    assert not missing, f"docs/migrating_from_trl.md has no table row for {missing}"
    for trl_name, (name, _) in TRL_ALIASES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{trl_name}`"))
        assert f"`{name}`" in row, row
