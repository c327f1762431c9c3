"""Run under `deepspeed --num_gpus 2` by tests/test_faults.py: NaN/inf injected into real engines' weights on one
rank. A non-finite loss skips the optimizer step on every rank and is counted; `max_consecutive_nonfinite` in a
row stop the run; non-finite student weights are neither saved nor exported. Each rank writes report-rank<R>.json.

    deepspeed --num_gpus 2 tests/distributed/nonfinite.py --out DIR [--deepspeed ds_configs/zero0.json]
"""

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
from helpers import gathered_weights, max_difference  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--deepspeed", default=None)
parser.add_argument("--local_rank", type=int, default=-1)
cli = parser.parse_args()
out = Path(cli.out)
rank, _ = engines.init_distributed()
report: dict = {}

args = SDFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=2, max_steps=10, learning_rate=1e-2,
                  lr_scheduler_type="constant", max_completion_length=8, logging_steps=1, seed=0,
                  max_consecutive_nonfinite=3, deepspeed=cli.deepspeed)
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), ref_model=str(model_dir("tiny-qwen2-teacher")),
                      args=args, processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                      train_dataset=str(DEMO_TRAIN))


def piece(engine, name: str):
    """The part of parameter `name` this rank holds (all of it where the engine does not partition)."""
    param = dict(engines.language_model(engine).named_parameters())[name]
    return getattr(param, "ds_tensor", param.data)


def poison(engine, name: str, only_rank: int) -> None:
    if rank == only_rank:
        piece(engine, name).fill_(float("nan"))


trainer.train_step()  # a finite step first: it moves the weights
report["first_step_applied"] = trainer.step_applied
before = gathered_weights(trainer.student)
healthy = piece(trainer.teacher, "model.embed_tokens.weight").clone()
poison(trainer.teacher, "model.embed_tokens.weight", only_rank=0)  # NaN in half the vocabulary rows: every batch meets one
outcomes = []
for _ in range(3):
    try:
        trainer.train_step()
        outcomes.append([trainer.step_applied, trainer.nonfinite_steps, trainer.nonfinite_in_a_row])
    except FloatingPointError as error:
        outcomes.append(str(error))
report["outcomes"] = outcomes
report["student_moved_while_nonfinite"] = max_difference(before, gathered_weights(trainer.student))
piece(trainer.teacher, "model.embed_tokens.weight").copy_(healthy)  # the skipped steps left no NaN in Adam's moments:
trainer.train_step()  # the next finite step moves the weights, finitely
report["recovered"] = [trainer.step_applied, trainer.nonfinite_in_a_row, engines.nonfinite_parameter(trainer.student)]
report["student_moved_after"] = max_difference(before, gathered_weights(trainer.student))

poison(trainer.student, "model.embed_tokens.weight", only_rank=1)  # one rank's partition: every rank must refuse
for what, call in (("export", lambda: trainer.save_model(str(out / "export"))), ("checkpoint", trainer.save_checkpoint)):
    try:
        call()
        report[what] = "written"
    except FloatingPointError as error:
        report[what] = str(error)
report["export_exists"] = (out / "export").exists()
report["checkpoint_exists"] = (out / "run" / "checkpoints").exists()
(out / f"report-rank{rank}.json").write_text(json.dumps(report))
