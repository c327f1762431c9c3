"""Command line: `deepspeed launch/train.py --config launch/recipes/<name>.yaml [--field value ...]`.

Every SDFTConfig field and every ScriptArguments field can be set in the recipe or on the command line; the
command line wins. `--help` lists them with their help text.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from sdft_ds.config import SDFTConfig


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


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(annotation):
    """argparse type for a dataclass field's evaluated annotation (`int | None`, `str | dict | None`, ...). An
    optional field takes `none` or `null`, so the command line can clear what a recipe set."""
    members = set(typing.get_args(annotation))
    options = members - {type(None)} or {annotation}
    if dict in options:
        def convert(text: str):
            return json.loads(text) if text.lstrip().startswith("{") else text
    elif bool in options:
        convert = _parse_bool
    else:
        convert = next((kind for kind in (int, float) if kind in options), str)
    if type(None) not in members:
        return convert

    def optional(text: str):
        return None if text.lower() in ("none", "null") else convert(text)
    return optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SDFT training on DeepSpeed ZeRO-3.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML recipe with any of the fields below.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    for cls in (ScriptArguments, SDFTConfig):
        group = parser.add_argument_group(cls.__name__)
        hints = typing.get_type_hints(cls)  # the annotations are strings (from __future__ import annotations)
        for f in fields(cls):
            group.add_argument(f"--{f.name}", type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                               help=f.metadata.get("help", ""))
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SDFTConfig]:
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    values: dict = {}
    if cli.get("config"):
        recipe = yaml.safe_load(Path(cli["config"]).read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"{cli['config']} must be a YAML mapping of field: value.")
        values.update(recipe)
    values.update({k: v for k, v in cli.items() if k not in ("config", "local_rank")})
    known = {f.name for cls in (ScriptArguments, SDFTConfig) for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"unknown field(s) {unknown}; see --help for the valid ones.")
    script_fields = {f.name for f in fields(ScriptArguments)}
    missing = [f.name for f in fields(ScriptArguments) if f.default is MISSING and f.name not in values]
    if missing:
        parser.error(f"missing required field(s) {missing}: set them in the recipe or on the command line.")
    script = ScriptArguments(**{k: v for k, v in values.items() if k in script_fields})
    config = SDFTConfig(**{k: v for k, v in values.items() if k not in script_fields})
    return script, config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    script, config = parse_args(argv)
    from sdft_ds.data import load_prompt_dataset, load_tokenizer  # here: `--help` and recipe checks need no torch
    from sdft_ds import engines
    from sdft_ds.trainer import SDFTTrainer

    tokenizer = load_tokenizer(script.tokenizer_name_or_path or script.model_name_or_path)
    dataset = load_prompt_dataset(script.dataset_name, script.dataset_split)
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
        print(f"trained model saved to {Path(output_dir).resolve()}")
    engines.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
