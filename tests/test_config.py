"""SDFTConfig validation and the command line: recipes, overrides, and errors that name the fix."""

from pathlib import Path

import pytest
import yaml

from sdft_ds import SDFTConfig
from sdft_ds.cli import parse_args
from sdft_ds.config import DS_CONFIG_DIR


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
                            "--deepspeed", '{"zero_optimization": {"stage": 3}}'])
    assert config.deepspeed == {"zero_optimization": {"stage": 3}}


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


@pytest.mark.parametrize("recipe", sorted((DS_CONFIG_DIR.parent / "launch" / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_recipes_parse_validate_and_document_hardware(recipe):
    script, config = parse_args(["--config", str(recipe)])
    assert "Hardware:" in recipe.read_text()
    for ds_config in (config.student_ds_config_path(), config.teacher_ds_config_path()):
        assert (DS_CONFIG_DIR.parent / ds_config).is_file() or Path(ds_config).is_file()
    assert script.model_name_or_path


def test_paper_recipe_holds_the_papers_settings():
    _, config = parse_args(["--config", str(DS_CONFIG_DIR.parent / "launch/recipes/paper_tool_use.yaml")])
    assert (config.distillation_alpha, config.distillation_mode, config.teacher_mode) == (0.0, "full", "ema")
    assert (config.teacher_update_rate, config.teacher_sync_steps, config.num_generations) == (0.01, 1, 1)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (1, 32)
    assert (config.learning_rate, config.lr_scheduler_type, config.num_train_epochs) == (1e-5, "cosine", 2)
    assert config.bf16 and config.num_loss_tokens_to_skip == 3
    assert (config.max_prompt_length, config.max_completion_length) == (1024, 2048)
    assert "including the thinking process" in config.teacher_prompt_template
