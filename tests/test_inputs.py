"""Inputs that used to fail only after a model load or engine build, or with a chain of tracebacks: model and
tokenizer sources, the hub offline, and what `launch/train.py` checks before it builds the trainer."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env
from sdft_ds.assets import DEMO_HELDOUT, DEMO_TRAIN, model_dir
from sdft_ds.cli import main
from sdft_ds.models import config_of

STUDENT = str(model_dir("tiny-qwen2-student"))


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "runs/a/final"])
def test_a_model_path_that_does_not_exist_is_named_as_a_folder(path):
    with pytest.raises(FileNotFoundError, match=f"no such folder: {path} \\(teacher\\)"):
        config_of(path, role="teacher")  # transformers: "Repo id must be in the form 'repo_name'..."


def test_a_model_path_that_is_a_file_is_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=f"student: {weights} is a file"):
        config_of(str(weights), role="student")


def test_a_hub_name_offline_gives_one_short_error_naming_the_model():
    code = ("import traceback\n"
            "from sdft_ds.data import load_tokenizer\n"
            "from sdft_ds.models import config_of\n"
            "for load in (lambda: config_of('sdft-ds-test/absent', role='teacher'), "
            "lambda: load_tokenizer('sdft-ds-test/absent')):\n"
            "    try:\n        load()\n    except OSError:\n        traceback.print_exc()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env(HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    for role in ("teacher", "tokenizer"):
        assert (f"OSError: {role} 'sdft-ds-test/absent' is not in the local Hugging Face cache and the hub is "
                "unreachable") in done.stderr
    assert done.stderr.count("Traceback") == 2  # one each: no chain of transformers' and the hub's
    assert "During handling" not in done.stderr and "direct cause" not in done.stderr


def _eval_set_without_answers(tmp_path):
    path = tmp_path / "heldout.jsonl"
    rows = [json.loads(line) for line in DEMO_HELDOUT.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "answer"}) + "\n" for row in rows))
    return path


def test_train_py_checks_the_eval_set_before_the_trainer(tmp_path):
    eval_set = _eval_set_without_answers(tmp_path)
    with pytest.raises(ValueError, match=rf"The eval set \(eval_dataset_name='{eval_set}'\) needs an 'answer' column"):
        main(["--model_name_or_path", STUDENT, "--dataset_name", str(DEMO_TRAIN), "--eval_dataset_name",
              str(eval_set), "--output_dir", str(tmp_path / "out")])


def test_train_py_names_a_bad_eval_row_as_the_eval_sets(tmp_path):
    eval_set = tmp_path / "heldout.jsonl"
    eval_set.write_text(json.dumps({"prompt": " ", "teacher_prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"The eval set .*: Row 0: column 'prompt' is empty"):
        main(["--model_name_or_path", STUDENT, "--dataset_name", str(DEMO_TRAIN), "--eval_dataset_name",
              str(eval_set), "--output_dir", str(tmp_path / "out")])


def test_train_py_refuses_fp16_where_deepspeed_cannot_train_in_it_before_loading_anything(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's accelerator trains in fp16")
    with pytest.raises(ValueError, match="fp16=True, but DeepSpeed cannot train in fp16"):
        main(["--model_name_or_path", "./no/such/model", "--dataset_name", str(DEMO_TRAIN), "--fp16",
              "--output_dir", str(tmp_path / "out")])  # refused before the model path is even looked at


def test_train_py_names_a_missing_student_folder_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such folder: \./no/such/model \(student\)"):
        main(["--model_name_or_path", "./no/such/model", "--dataset_name", str(DEMO_TRAIN),
              "--output_dir", str(tmp_path / "out")])
