"""SDFTConfig validation and the command line: recipes, overrides, and errors that name the fix."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from sdft_ds import SDFTConfig
from sdft_ds.cli import parse_args
from sdft_ds.config import DS_CONFIG_DIR, ds_config_file, read_ds_config

from conftest import REPO


@pytest.mark.parametrize("kwargs, message", [
    (dict(distillation_alpha=1.5), "distillation_alpha must be in"),
    (dict(distillation_mode="sampled_token", distillation_alpha=0.5), "set distillation_alpha=1.0"),
    (dict(teacher_mode="student"), "teacher_mode='student' is not valid"),
    (dict(num_loss_tokens_to_skip=8, max_completion_length=8), "leaves no completion token"),
    (dict(teacher_prompt_template="{prompt}"), r"must contain \{privileged_context\}"),
    (dict(per_device_train_batch_size=3, num_generations=2), "multiple of num_generations=2"),
    (dict(gradient_accumulation_steps=2, steps_per_generation=3), "positive multiple of"),
    (dict(bf16=True, fp16=True), "choose one"),
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be at least 1"),
])
def test_bad_settings_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig(**kwargs)


def test_defaults_follow_the_paper_and_trl():
    config = SDFTConfig()
    assert config.distillation_alpha == 0.0 and config.num_generations == 1
    assert config.steps_per_generation == config.gradient_accumulation_steps
    assert not config.reuses_rollouts
    assert SDFTConfig(gradient_accumulation_steps=2, steps_per_generation=4).reuses_rollouts
    assert SDFTConfig(num_iterations=2).reuses_rollouts


def test_every_field_has_help():
    assert all(SDFTConfig.field_help().values())


def test_recipe_then_command_line_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d", "learning_rate": 1e-4,
                                      "bf16": True, "max_steps": 7}))
    script, config = parse_args(["--config", str(recipe), "--learning_rate", "2e-5", "--bf16", "false",
                                 "--deepspeed", str(DS_CONFIG_DIR / "zero3.json"), "--local_rank=1"])
    assert script.model_name_or_path == "m" and config.max_steps == 7
    assert config.learning_rate == 2e-5 and config.bf16 is False
    assert config.deepspeed.endswith("zero3.json")
    _, config = parse_args(["--model_name_or_path", "m", "--dataset_name", "d",
                            "--deepspeed", '{"train_batch_size": 8, "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}'])
    assert config.deepspeed == {"train_batch_size": 8, "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}


def test_command_line_clears_an_optional_field_of_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_name: d\nref_model_name_or_path: t\nsteps_per_generation: 2\n")
    script, config = parse_args(["--config", str(recipe), "--ref_model_name_or_path", "none",
                                 "--steps_per_generation", "null", "--max_steps", "3"])
    assert script.ref_model_name_or_path is None and config.max_steps == 3
    assert config.steps_per_generation == config.gradient_accumulation_steps  # None: the default applies


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "d"])
    assert "missing required field(s) ['model_name_or_path']" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_name: d\nlearnig_rate: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(recipe)])
    assert "unknown field(s) ['learnig_rate']" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted((REPO / "launch" / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_recipes_parse_validate_and_document_hardware(recipe):
    script, config = parse_args(["--config", str(recipe)])
    assert "Hardware:" in recipe.read_text()
    for ds_config in (config.student_ds_config_path(), config.teacher_ds_config_path()):
        assert ds_config_file(ds_config).is_file()  # from any working directory
    assert script.model_name_or_path


def test_paper_recipe_holds_the_papers_settings():
    _, config = parse_args(["--config", str(REPO / "launch/recipes/paper_tool_use.yaml")])
    assert (config.distillation_alpha, config.distillation_mode, config.teacher_mode) == (0.0, "full", "ema")
    assert (config.teacher_update_rate, config.teacher_sync_steps, config.num_generations) == (0.01, 1, 1)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (1, 32)
    assert (config.learning_rate, config.lr_scheduler_type, config.num_train_epochs) == (1e-5, "cosine", 2)
    assert config.bf16 and config.num_loss_tokens_to_skip == 3
    assert (config.max_prompt_length, config.max_completion_length) == (1024, 2048)
    assert "including the thinking process" in config.teacher_prompt_template


def test_the_lora_recipe_is_the_paper_recipe_with_an_adapter():
    _, full = parse_args(["--config", str(REPO / "launch/recipes/paper_tool_use.yaml")])
    _, lora = parse_args(["--config", str(REPO / "launch/recipes/paper_tool_use_lora.yaml")])
    differ = {f.name for f in dataclasses.fields(full) if getattr(full, f.name) != getattr(lora, f.name)}
    assert differ == {"use_peft", "lora_r", "lora_alpha", "save_merged_model", "learning_rate", "output_dir",
                      "run_name", "deepspeed", "teacher_deepspeed"}
    assert (lora.lora_r, lora.lora_target_modules, lora.learning_rate) == (64, "all-linear", 1e-4)


# ---- recipe values, types and ranges (PROBE: `1e-5` in YAML, negative rates, max_steps 2.5, ...)

def _recipe(tmp_path, text: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_name: d\n" + text)
    return recipe


def test_recipe_values_are_converted_as_the_command_line_converts_them(tmp_path):
    # PyYAML reads 1e-5 (no dot) and "4" as strings; the optimizer would get them as such after the engines
    recipe = _recipe(tmp_path, 'learning_rate: 1e-5\nper_device_train_batch_size: "4"\nbf16: "yes"\n'
                               "max_steps: 3.0\nnum_train_epochs: 2\nsteps_per_generation: null\n")
    _, config = parse_args(["--config", str(recipe)])
    assert config.learning_rate == 1e-5 and type(config.learning_rate) is float
    assert config.per_device_train_batch_size == 4 and type(config.per_device_train_batch_size) is int
    assert config.bf16 is True and config.max_steps == 3 and type(config.max_steps) is int
    assert config.num_train_epochs == 2.0 and type(config.num_train_epochs) is float


@pytest.mark.parametrize("line, value", [("max_steps: 2.5", "2.5"), ("learning_rate: fast", "'fast'"),
                                         ("bf16: maybe", "'maybe'"), ('per_device_train_batch_size: "4x"', "'4x'")])
def test_recipe_value_of_the_wrong_type_names_recipe_field_and_value(tmp_path, capsys, line, value):
    recipe = _recipe(tmp_path, line + "\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(recipe)])
    field = line.split(":")[0]
    assert f"{recipe}: {field}: {value} is not" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-1e-5), r"learning_rate must be in \(0, 1\], got -1e-05"),
    (dict(learning_rate=0), r"learning_rate must be in \(0, 1\]"),
    (dict(learning_rate=1e6), r"learning_rate must be in \(0, 1\], got 1000000.0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number, got nan"),
    (dict(learning_rate="1e-5"), "learning_rate must be a finite number, got '1e-5'"),
    (dict(max_steps=2.5), r"max_steps must be an integer, got 2.5 \(float\)"),
    (dict(max_steps=0), "max_steps must be a positive number of optimizer steps, or -1"),
    (dict(per_device_train_batch_size=1.5), "per_device_train_batch_size must be an integer, got 1.5"),
    (dict(save_total_limit=2.5), "save_total_limit must be an integer or None, got 2.5"),
    (dict(warmup_ratio=2), r"warmup_ratio .* must be in \[0, 1\], got 2.0"),
    (dict(warmup_ratio=-0.1), r"warmup_ratio .* must be in \[0, 1\]"),
    (dict(save_steps=-3), "save_steps must be >= 0, got -3"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(num_train_epochs=-1.0), "num_train_epochs must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(adam_beta2=1.0), r"adam_beta2 must be in \[0, 1\)"),
    (dict(logging_steps=0), "logging_steps must be at least 1"),
    (dict(bf16="false"), "bf16 must be true or false, got 'false'"),
    (dict(bf16=1), r"bf16 must be true or false, got 1 \(int\)"),
    (dict(max_steps=True), "max_steps must be an integer, got True"),
    (dict(run_name=3), "run_name must be a string or None, got 3"),
    (dict(lr_scheduler_type="cosin"), "lr_scheduler_type='cosin' is no transformers scheduler; choose one of linear"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), "needs lr_scheduler_kwargs or a metric"),
])
def test_out_of_range_and_mistyped_numbers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig(**kwargs)


def test_integral_numbers_fill_int_fields_and_ints_fill_float_fields():
    config = SDFTConfig(max_steps=3.0, num_train_epochs=2, lr_scheduler_type="cosine_with_restarts")
    assert type(config.max_steps) is int and config.max_steps == 3
    assert type(config.num_train_epochs) is float and config.num_train_epochs == 2.0


def test_fp16_is_refused_before_any_engine_where_deepspeed_cannot_train_in_it():
    from deepspeed.accelerator import get_accelerator

    from sdft_ds import engines

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's accelerator trains in fp16")
    config = SDFTConfig(fp16=True)  # a config for another machine can still be written here
    with pytest.raises(ValueError, match=r"fp16=True, but DeepSpeed cannot train in fp16 on this machine's "
                                         r"accelerator \(cpu\)"):
        engines.check_accelerator(config)
    engines.check_accelerator(SDFTConfig())


# ---- the command line (PROBE: abbreviations, --help without defaults, bare boolean flags)

REQUIRED = ["--model_name_or_path", "m", "--dataset_name", "d"]


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args([*REQUIRED, "--learning", "1e-4"])
    assert "unrecognized arguments: --learning" in capsys.readouterr().err


def test_help_shows_every_default_and_what_save_steps_0_does():
    from sdft_ds.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "Peak learning rate of the student (paper: 1e-5). (default: 1e-05)" in text
    assert "Student checkpoint (local path or hub name). (required)" in text
    assert "(default: 'linear')" in text and "(default: False)" in text
    assert "0: only at the end" not in text
    assert "0: none except on SIGTERM/SIGUSR1" in text


def test_a_bare_boolean_flag_means_true():
    _, config = parse_args([*REQUIRED, "--bf16", "--max_steps", "3", "--gradient_checkpointing"])
    assert config.bf16 is True and config.gradient_checkpointing is True and config.max_steps == 3
    _, config = parse_args([*REQUIRED, "--bf16", "false"])
    assert config.bf16 is False


def test_command_line_integers_may_be_written_as_integral_numbers(capsys):
    _, config = parse_args([*REQUIRED, "--max_steps", "1e3"])
    assert config.max_steps == 1000
    with pytest.raises(SystemExit):
        parse_args([*REQUIRED, "--max_steps", "2.5"])
    assert "expected an integer, got '2.5'" in capsys.readouterr().err


# ---- DeepSpeed configs, read when the config is made (PROBE: errors only after the engines)

ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}


@pytest.mark.parametrize("field, role", [("deepspeed", "student"), ("teacher_deepspeed", "teacher")])
def test_a_deepspeed_file_that_is_not_json_names_file_and_role(tmp_path, field, role):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": "auto",}')
    with pytest.raises(ValueError, match=rf"The {role} DeepSpeed config \({field}\) '{path}' is not valid JSON"):
        SDFTConfig(**{field: str(path)})


def test_a_missing_teacher_deepspeed_file_is_refused_with_the_config():
    with pytest.raises(FileNotFoundError, match=r"The teacher DeepSpeed config \(teacher_deepspeed\) "
                                                "'ds_configs/teacher_zero9.json' does not exist"):
        SDFTConfig(teacher_deepspeed="ds_configs/teacher_zero9.json")


def test_an_inline_deepspeed_dict_without_a_batch_size_is_refused():
    with pytest.raises(ValueError, match="sets neither train_micro_batch_size_per_gpu nor train_batch_size"):
        SDFTConfig(deepspeed={"zero_optimization": {"stage": 3}})
    assert SDFTConfig(deepspeed=ZERO3).deepspeed == ZERO3


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_nvme_offload_to_a_missing_folder_names_key_and_path(tmp_path, key):
    missing = tmp_path / "nvme"
    config = {**ZERO3, "zero_optimization": {"stage": 3, key: {"device": "nvme", "nvme_path": str(missing)}}}
    with pytest.raises(ValueError, match=rf"zero_optimization.{key}.nvme_path = '{missing}' is no existing folder"):
        SDFTConfig(teacher_deepspeed=config)
    missing.mkdir()
    SDFTConfig(teacher_deepspeed=config)


@pytest.mark.parametrize("path", sorted(DS_CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_deepspeed_configs_pass_the_checks(path):
    role = "teacher" if path.stem.startswith("teacher") else "student"
    assert read_ds_config(str(path), role)["bf16"] == {"enabled": "auto"}


def test_a_student_deepspeed_config_without_an_optimizer_is_refused_with_the_config():
    with pytest.raises(ValueError, match=r"The student DeepSpeed config \(deepspeed\) has no 'optimizer' section"):
        SDFTConfig(deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}})
    SDFTConfig(teacher_deepspeed={"train_micro_batch_size_per_gpu": "auto"})  # an inference engine needs none


def test_the_hybrid_engine_is_refused_before_any_model_under_transformers_5():
    from sdft_ds import engines

    student = {**read_ds_config(DS_CONFIG_DIR / "zero3_offload.json", "student"), "hybrid_engine": {"enabled": True}}
    with pytest.raises(ValueError, match="enables `hybrid_engine`, but DeepSpeed 0.19's hybrid engine does not run "
                                         "transformers 5 models.*Remove its `hybrid_engine` section"):
        engines.check_accelerator(SDFTConfig(deepspeed=student))
