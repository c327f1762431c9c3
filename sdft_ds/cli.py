"""Command line: `launch/run.sh launch/train.py --config launch/recipes/<name>.yaml [--field value ...]`.

Every SDFTConfig field and every ScriptArguments field can be set in the recipe or on the command line; the
command line wins. `--help` lists them with their help text.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from sdft_ds.config import TRL_ALIASES, TRL_UNSUPPORTED, SDFTConfig, describe, field_types, package_path


@dataclass
class ScriptArguments:
    """What to train on: models, data, held-out set. The rest is SDFTConfig."""

    model_name_or_path: str = field(metadata={"help": "Student checkpoint (local path or hub name)."})
    dataset_name: str = field(metadata={
        "help": "Training prompts: local json/jsonl/parquet file(s) (comma-separated) or a hub dataset."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Teacher checkpoint; default: a copy of the student."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer; default: the student's."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "Held-out rows with an `answer` column: the divergence on them is reported before and after."})

    def __post_init__(self) -> None:
        # a path written from the checkout's root (the shipped recipes' sdft_ds/assets/...) is found in the installed
        # package from any working directory; one that exists relative to the working directory wins
        for name in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, package_path(getattr(self, name)))
        for name in ("dataset_name", "eval_dataset_name"):  # comma-separated files
            if isinstance(getattr(self, name), str):
                setattr(self, name, ",".join(package_path(part) for part in getattr(self, name).split(",")))


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_int(text: str) -> int:
    """An integer, also written as an integral float (`2.0`, `1e3`), as SDFTConfig takes one."""
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        return int(number)


def _converter(annotation):
    """argparse type for a dataclass field's evaluated annotation (`int | None`, `str | dict | None`, ...), and the
    conversion of recipe values. An optional field takes `none` or `null`, so the command line can clear what a
    recipe set."""
    members = field_types(annotation)
    options = members - {type(None)}
    if dict in options:
        def convert(text: str):
            return json.loads(text) if text.lstrip().startswith("{") else text
    elif bool in options:
        convert = _parse_bool
    elif int in options:
        convert = _parse_int
    else:
        convert = float if float in options else str
    if type(None) not in members:
        return convert

    def optional(text: str):
        return None if text.lower() in ("none", "null") else convert(text)
    return optional


def _type_hints() -> dict:
    """Every field's evaluated annotation (they are strings under `from __future__ import annotations`)."""
    return {name: hint for cls in (ScriptArguments, SDFTConfig) for name, hint in typing.get_type_hints(cls).items()}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--learning 1e-4` would otherwise set learning_rate, and a typo another field
    parser = argparse.ArgumentParser(description="SDFT training on DeepSpeed ZeRO-3.", allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe with any of the fields below.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    hints = _type_hints()
    for cls in (ScriptArguments, SDFTConfig):
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            # default=SUPPRESS, so that only what the command line sets overrides the recipe; the help shows it
            default = "required" if f.default is MISSING else f"default: {f.default!r}"
            help_text = f"{f.metadata.get('help', '')} ({default})".replace("%", "%%")
            bare = dict(nargs="?", const=True) if bool in field_types(hints[f.name]) else {}  # `--bf16` alone: true
            group.add_argument(f"--{f.name}", type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                               help=help_text, **bare)
    return parser


def _read_recipe(parser: argparse.ArgumentParser, recipe: str, hints: dict) -> dict:
    """A recipe's values converted exactly as the command line converts its text: PyYAML reads `1e-5` (no dot)
    and `"4"` as strings, which would otherwise reach the optimizer as such."""
    try:
        values = yaml.safe_load(Path(recipe).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"cannot read the recipe {recipe}: {error}")
    if not isinstance(values, dict):
        parser.error(f"{recipe} must be a YAML mapping of field: value.")
    trl_names = set(TRL_ALIASES) | set(TRL_UNSUPPORTED)  # a TRL recipe's own names: SDFTConfig maps or refuses them
    unknown = sorted(set(values) - set(hints) - trl_names)
    if unknown:
        parser.error(f"{recipe}: unknown field(s) {unknown}; see --help for the valid ones.")
    for name, value in values.items():
        # YAML scalars of our fields; a dict (deepspeed), a list or a TRL name is left to SDFTConfig
        if name in hints and isinstance(value, (str, int, float)):
            try:
                values[name] = _converter(hints[name])(str(value))
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{recipe}: {name}: {value!r} is not {describe(field_types(hints[name]))} ({error}); "
                             "correct it in the recipe.")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SDFTConfig]:
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    values = _read_recipe(parser, cli["config"], _type_hints()) if cli.get("config") else {}
    values.update({k: v for k, v in cli.items() if k not in ("config", "local_rank")})
    script_fields = {f.name for f in fields(ScriptArguments)}
    missing = [f.name for f in fields(ScriptArguments) if f.default is MISSING and f.name not in values]
    if missing:
        parser.error(f"missing required field(s) {missing}: set them in the recipe or on the command line.")
    script = ScriptArguments(**{k: v for k, v in values.items() if k in script_fields})
    try:
        config = SDFTConfig(**{k: v for k, v in values.items() if k not in script_fields})
    except (ValueError, FileNotFoundError) as error:  # a setting's error is the user's, not the code's: no traceback
        parser.error(str(error))
    teacher_only = [name for name in ("ref_model_name_or_path", "eval_dataset_name") if getattr(script, name)]
    if config.method == "sft" and teacher_only:
        parser.error(f"method=sft builds no teacher, so {' and '.join(teacher_only)} (a teacher, or the teacher's "
                     "held-out divergence) cannot apply; drop them, or compare the trained models with "
                     "sdft-eval (python -m sdft_ds.evaluate).")
    return script, config


def check_eval_set(source, template: str) -> None:
    """The held-out set is read only after the engines are built (SDFTTrainer.heldout_divergence); its errors are
    found here instead, naming it as the eval set."""
    from sdft_ds.data import load_prompt_dataset, validate_rows, with_teacher_prompts

    where = f"The eval set (eval_dataset_name={str(source)!r})"
    try:
        dataset = with_teacher_prompts(load_prompt_dataset(source), template)
        validate_rows(dataset)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if "answer" not in dataset.column_names:
        raise ValueError(f"{where} needs an 'answer' column, the reference completion whose divergence is reported "
                         f"before and after training; it has {sorted(dataset.column_names)}. Add it, or drop "
                         "eval_dataset_name.")
    bad = [row for row, answer in enumerate(dataset["answer"]) if not isinstance(answer, str) or not answer.strip()]
    if bad:
        raise ValueError(f"{where}: 'answer' is empty or not a string in rows {bad[:5]}; fill them in or remove them.")


def _setup_console() -> None:
    """One readable console for the whole job: sdft_ds's own INFO lines from rank 0 only (the others warn and fail
    in their own words), and, when the output is no terminal, no progress bars (to a pipe or log file each redraw
    is a new line). DeepSpeed's own log level is SDFTConfig.deepspeed_log_level, set by the trainer."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers


def summary_line(summary: dict, output_dir: str, adapter: bool = False) -> str:
    """The job's last line: `done: 40 optimizer steps (40 in this run), 61.9 s of training, 745 tokens/s; trained
    model saved to /abs/path` (training: the loop's wall-clock time, engine construction and export aside); with
    LoRA, what was saved is the adapter."""
    what = "LoRA adapter (load with peft's PeftModel.from_pretrained)" if adapter else "model"
    return (f"done: {summary['steps']} optimizer steps ({summary['steps_run']} in this run), "
            f"{summary['seconds']:.1f} s of training, {summary['tokens_per_second']:,.0f} tokens/s; trained {what} "
            f"saved to {Path(output_dir).resolve()}")


def main(argv: list[str] | None = None) -> None:
    _setup_console()
    script, config = parse_args(argv)
    from sdft_ds.data import load_prompt_dataset, load_tokenizer  # here: `--help` needs no torch
    from sdft_ds import engines
    from sdft_ds.trainer import SDFTTrainer

    engines.check_accelerator(config)
    tokenizer = load_tokenizer(script.tokenizer_name_or_path or script.model_name_or_path,
                               role="tokenizer" if script.tokenizer_name_or_path else "student")
    dataset = load_prompt_dataset(script.dataset_name, script.dataset_split)
    if script.eval_dataset_name:
        check_eval_set(script.eval_dataset_name, config.teacher_prompt_template)
    trainer = SDFTTrainer(model=script.model_name_or_path, ref_model=script.ref_model_name_or_path, args=config,
                          processing_class=tokenizer, train_dataset=dataset)
    before = trainer.heldout_divergence(script.eval_dataset_name) if script.eval_dataset_name else None
    trainer.train()
    if trainer.stop_signal:  # a checkpoint was saved; the run is not finished, so nothing is exported
        engines.shutdown()
        sys.exit(128 + trainer.stop_signal)
    after = trainer.heldout_divergence(script.eval_dataset_name) if script.eval_dataset_name else None
    output_dir = trainer.save_model()
    if config.push_to_hub:
        trainer.push_to_hub()
    if trainer.rank == 0:
        if before is not None:
            print(f"held-out divergence (alpha={config.distillation_alpha}): before {before:.4f} -> after {after:.4f}")
        print(summary_line(trainer.summary, output_dir, adapter=trainer.peft is not None))
    engines.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
