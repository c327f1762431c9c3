"""Refusals that must come before any process group or engine: a wrong pairing costs seconds, not a GPU job."""

import pytest
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import model_dir

ROWS = Dataset.from_dict({"prompt": ["Add 2 and 3."] * 4, "teacher_prompt": ["Add 2 and 3. Example: 5"] * 4})


@pytest.fixture(autouse=True)
def no_engines(monkeypatch):
    """Fail loudly if a refusal comes only after the trainer started on process groups and engines."""
    def too_late():
        raise AssertionError("the trainer reached init_distributed before refusing")
    monkeypatch.setattr("sdft_ds.engines.init_distributed", too_late)


def make(tokenizer, ref_model=None, dataset=ROWS, **settings):
    return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), ref_model=ref_model,
                       args=SDFTConfig(output_dir="unused", **settings), processing_class=tokenizer,
                       train_dataset=dataset)


def test_ema_refuses_a_teacher_of_another_architecture(tokenizer):
    with pytest.raises(ValueError, match="teacher_mode='ema' averages student weights"):
        make(tokenizer, ref_model=str(model_dir("tiny-qwen2-teacher")), teacher_mode="ema")


def test_live_teacher_refuses_a_separate_ref_model(tokenizer):
    with pytest.raises(ValueError, match="drop ref_model"):
        make(tokenizer, ref_model=str(model_dir("tiny-qwen2-teacher")), teacher_mode="live")


def test_teacher_with_another_vocabulary_is_refused(tokenizer):
    config = AutoConfig.from_pretrained(model_dir("tiny-qwen2-teacher"))
    config.vocab_size += 64
    with pytest.raises(ValueError, match="vocabularies differ"):
        make(tokenizer, ref_model=AutoModelForCausalLM.from_config(config))


def test_bad_rows_fail_before_any_engine(tokenizer):
    with pytest.raises(ValueError, match="Row 0: column 'teacher_prompt' is empty"):
        make(tokenizer, dataset=Dataset.from_dict({"prompt": ["x"], "teacher_prompt": [""]}))
