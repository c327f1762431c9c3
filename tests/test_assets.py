"""The committed offline assets load and hold the properties the rest of the package relies on."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdft_ds.assets import (
    DEMO_HELDOUT,
    DEMO_HELDOUT_CHAT,
    DEMO_TRAIN,
    DEMO_TRAIN_CHAT,
    MODEL_NAMES,
    TOKENIZER_DIR,
    model_dir,
)

COLUMNS = {"prompt", "teacher_prompt", "privileged_context", "answer", "skill"}
TIED = {"tiny-qwen2-student": True, "tiny-qwen2-teacher": True, "tiny-llama": False}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-teacher")).eval()


def test_tokenizer_special_tokens(tok):
    assert len(tok) == 1024
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1


@pytest.mark.parametrize("text", ["Reverse the word 'planet'.", "naïve café, 42 × 7 = ? 😀\n\ttabs"])
def test_tokenizer_round_trips(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # transformers 5.x: tokenize=True gives a dict (BatchEncoding), not a list of ids.
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert encoded["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_model_dir_rejects_unknown_names():
    with pytest.raises(ValueError, match="tiny-qwen2-student"):
        model_dir("gpt2")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_loads_and_generates(tok, name):
    model = AutoModelForCausalLM.from_pretrained(model_dir(name)).eval()
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings is TIED[name]
    shared = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert shared is TIED[name]
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample) == ([2, 0], 0, True)

    chat = [{"role": "user", "content": "Uppercase: 'river'"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


def test_dataset_shapes_and_splits():
    train, chat, heldout = read_jsonl(DEMO_TRAIN), read_jsonl(DEMO_TRAIN_CHAT), read_jsonl(DEMO_HELDOUT)
    assert (len(train), len(chat), len(heldout)) == (320, 320, 32)
    for row in train + chat + heldout:
        assert set(row) == COLUMNS
    for row in train + heldout:
        assert row["privileged_context"] == row["answer"]
        assert row["teacher_prompt"] == (
            f"{row['prompt']}\n\nThis is an example for a response to the question:\n{row['answer']}"
            "\n\nNow answer with a response of your own."
        )
    for s, c in zip(train, chat):
        assert c["prompt"] == [{"role": "user", "content": s["prompt"]}]
        assert c["teacher_prompt"] == [{"role": "user", "content": s["teacher_prompt"]}]
        assert {k: c[k] for k in ("privileged_context", "answer", "skill")} == {
            k: s[k] for k in ("privileged_context", "answer", "skill")
        }
    assert len({r["prompt"] for r in train}) == 320
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    heldout_chat = read_jsonl(DEMO_HELDOUT_CHAT)
    assert [r["prompt"][-1]["content"] for r in heldout_chat] == [r["prompt"] for r in heldout]


def answer_loss(model, tok, prompt: str, answer: str) -> float:
    """Mean NLL (nats/token) of answer<|im_end|> after the chat-formatted prompt."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    c = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    labels = torch.tensor([[-100] * len(p) + c])
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_demonstration_lowers_teacher_loss(tok, teacher):
    """The point of the task: with the demonstration in context the teacher predicts the answer better."""
    rows = read_jsonl(DEMO_HELDOUT)[:8]
    demo = [answer_loss(teacher, tok, r["teacher_prompt"], r["answer"]) for r in rows]
    bare = [answer_loss(teacher, tok, r["prompt"], r["answer"]) for r in rows]
    mean_demo, mean_bare = sum(demo) / len(demo), sum(bare) / len(bare)
    print(f"teacher answer loss on {len(rows)} held-out rows: demo {mean_demo:.3f} vs bare {mean_bare:.3f} nats/token")
    assert mean_demo < mean_bare
    assert sum(d < b for d, b in zip(demo, bare)) >= 6
