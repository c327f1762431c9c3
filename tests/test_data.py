"""Prompt formatting and validation: every bad input fails before an engine exists, naming row and fix."""

import pytest
from datasets import Dataset, DatasetDict

from sdft_ds.assets import DEMO_TRAIN, DEMO_TRAIN_CHAT
from sdft_ds.data import (PromptSampler, left_pad, load_prompt_dataset, load_tokenizer, tokenize_prompts,
                          validate_rows, with_teacher_prompts)


def test_string_rows_tokenize_as_plain_text(tokenizer):
    data = Dataset.from_dict({"prompt": ["Add 2 and 3."], "teacher_prompt": ["Add 2 and 3.\n\nExample: 5"]})
    out = tokenize_prompts(data, tokenizer, 64, 64)
    assert out.prompt_ids[0] == tokenizer("Add 2 and 3.")["input_ids"]
    assert out.teacher_prompt_ids[0] == tokenizer("Add 2 and 3.\n\nExample: 5")["input_ids"]


def test_conversational_rows_use_the_chat_template_with_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "Add 2 and 3."}]
    data = Dataset.from_dict({"prompt": [messages], "teacher_prompt": [messages]})
    out = tokenize_prompts(data, tokenizer, 64, 64)
    text = tokenizer.decode(out.prompt_ids[0])
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_string_and_chat_demo_files_hold_the_same_rows():
    plain, chat = load_prompt_dataset(str(DEMO_TRAIN)), load_prompt_dataset(str(DEMO_TRAIN_CHAT))
    assert len(plain) == len(chat)
    assert chat[0]["prompt"][-1]["content"] == plain[0]["prompt"]


def test_teacher_prompt_built_from_privileged_context():
    data = Dataset.from_dict({"prompt": ["Q?"], "privileged_context": ["demo"]})
    built = with_teacher_prompts(data, "{prompt}\n\n{privileged_context}")
    assert built[0]["teacher_prompt"] == "Q?\n\ndemo"
    chat = Dataset.from_dict({"prompt": [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]],
                              "privileged_context": ["demo"]})
    built = with_teacher_prompts(chat, "{prompt} | {privileged_context}")
    assert built[0]["teacher_prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q | demo"}]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="'prompt' column"):
        with_teacher_prompts(Dataset.from_dict({"question": ["x"]}), "{prompt}{privileged_context}")
    with pytest.raises(ValueError, match="teacher_prompt = prompt"):
        with_teacher_prompts(Dataset.from_dict({"prompt": ["x"]}), "{prompt}{privileged_context}")


@pytest.mark.parametrize("prompt, message", [
    ("   ", "Row 1: column 'prompt' is empty"),
    (123, "Row 1: column 'prompt' must be a string or a list of chat messages, not int"),
    ([], "Row 1: column 'prompt' is an empty conversation"),
    ([{"content": "no role"}], "Row 1: column 'prompt' must be a list of"),
])
def test_bad_rows_are_named(prompt, message):
    # Arrow cannot hold these mixed columns; a hand-made dataset (or a json file read as objects) can.
    with pytest.raises(ValueError, match=message):
        validate_rows({"prompt": ["fine", prompt], "teacher_prompt": ["fine", "fine"]})


def test_empty_dataset_and_missing_pad_token(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        validate_rows(Dataset.from_dict({"prompt": [], "teacher_prompt": []}))
    no_pad = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    no_pad.pad_token = None
    data = Dataset.from_dict({"prompt": ["x"], "teacher_prompt": ["y"]})
    with pytest.raises(ValueError, match="tokenizer.pad_token = tokenizer.eos_token"):
        tokenize_prompts(data, no_pad, 8, 8)


def test_loaded_tokenizer_without_pad_token_pads_with_eos(tokenizer, tmp_path):
    """What the command line and SDFTTrainer(model=<path>) load; a pad token it has is kept."""
    no_pad = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == tokenizer.eos_token
    assert load_tokenizer(tokenizer.name_or_path).pad_token == tokenizer.pad_token


def test_chat_rows_need_a_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x"}]], "teacher_prompt": ["y"]})
    with pytest.raises(ValueError, match="chat template"):
        tokenize_prompts(data, plain, 8, 8)


def test_long_prompts_are_cut_from_the_left_and_counted(tokenizer, caplog):
    long = " ".join(["word"] * 50)
    data = Dataset.from_dict({"prompt": [long, "short"], "teacher_prompt": [long + " demo", "short"]})
    out = tokenize_prompts(data, tokenizer, max_prompt_length=10, max_teacher_prompt_length=1000)
    assert len(out.prompt_ids[0]) == 10 and out.truncated_rows == {0}
    assert out.prompt_ids[0] == tokenizer(long)["input_ids"][-10:]  # the end of the prompt survives
    assert not out.truncated_teacher_rows  # the teacher prompt has its own, larger limit
    assert "rows 0" in caplog.text


QUESTION = "Subtract 15 from 86."
DEMONSTRATION = " ".join(["seventy-one"] * 40)
TEMPLATE = "{prompt}\n\nThis is an example for a response to the question:\n{privileged_context}\n\nNow answer."


def test_long_teacher_prompts_lose_the_end_of_their_context_not_the_question(tokenizer, caplog):
    """SPEC §4: the demonstration must not cut the question away. Cut from the left, the teacher prompt would lose
    the question and keep the demonstration; it loses the end of the demonstration instead."""
    data = with_teacher_prompts(Dataset.from_dict({"prompt": [QUESTION, "short"],
                                                   "privileged_context": [DEMONSTRATION, "5"]}), TEMPLATE)
    full = len(tokenizer(data["teacher_prompt"][0])["input_ids"])
    out = tokenize_prompts(data, tokenizer, max_prompt_length=64, max_teacher_prompt_length=full - 20)
    assert out.truncated_teacher_rows == {0} and "privileged_context is cut from its end (rows 0)" in caplog.text
    ids = out.teacher_prompt_ids[0]
    text = tokenizer.decode(ids)
    assert full - 20 - 3 <= len(ids) <= full - 20  # as much of the demonstration as fits
    assert text.startswith(QUESTION + "\n\nThis is an example") and text.endswith("\n\nNow answer.")
    assert "seventy-one" in text and text.count("seventy") < 40
    assert out.teacher_prompt_ids[1] == tokenizer(TEMPLATE.format(prompt="short", privileged_context="5"))["input_ids"]


def test_long_chat_teacher_prompts_are_cut_inside_the_context(tokenizer):
    chat = [{"role": "user", "content": QUESTION}]
    data = with_teacher_prompts(Dataset.from_dict({"prompt": [chat], "privileged_context": [DEMONSTRATION]}),
                                TEMPLATE)
    out = tokenize_prompts(data, tokenizer, max_prompt_length=64, max_teacher_prompt_length=60)
    text = tokenizer.decode(out.teacher_prompt_ids[0])
    assert len(out.teacher_prompt_ids[0]) <= 60 and out.truncated_teacher_rows == {0}
    assert QUESTION in text and text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.parametrize("case", ["no context column", "context not in the prompt", "question too long"])
def test_teacher_prompts_that_cannot_be_cut_safely_are_refused(tokenizer, case):
    long = QUESTION + " " + DEMONSTRATION
    rows = {"no context column": {"prompt": ["ok", QUESTION], "teacher_prompt": ["ok", long]},
            "context not in the prompt": {"prompt": ["ok", QUESTION], "teacher_prompt": ["ok", long],
                                          "privileged_context": ["", "something else"]},
            "question too long": {"prompt": ["ok", DEMONSTRATION], "teacher_prompt": ["ok", DEMONSTRATION + " 5"],
                                  "privileged_context": ["", "5"]}}[case]
    with pytest.raises(ValueError, match=r"exceed max_teacher_prompt_length=30 tokens \(rows 1\).*privileged_context"):
        tokenize_prompts(Dataset.from_dict(rows), tokenizer, max_prompt_length=200, max_teacher_prompt_length=30)


def test_left_pad_puts_tokens_flush_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_dataset_sources():
    data = Dataset.from_dict({"prompt": ["a"], "teacher_prompt": ["b"]})
    assert load_prompt_dataset(DatasetDict(train=data)) is not None
    with pytest.raises(ValueError, match="no split 'train'"):
        load_prompt_dataset(DatasetDict(validation=data))
    with pytest.raises(TypeError, match="train_dataset must be"):
        load_prompt_dataset(42)


def test_prompt_sampler_is_rank_disjoint_and_covers_an_epoch():
    samplers = [PromptSampler(10, 2, rank, 2, seed=3) for rank in range(2)]
    epoch = [i for _ in range(2) for s in samplers for i in s.next_round()]
    assert len(epoch) == 8 and len(set(epoch)) == 8  # 10 // (2 × 2) = 2 rounds, no repeats
    resumed, fresh = PromptSampler(10, 2, 0, 2, seed=3), PromptSampler(10, 2, 0, 2, seed=3)
    fresh.next_round()
    resumed.load_state_dict(fresh.state_dict())
    assert resumed.next_round() == fresh.next_round()
    with pytest.raises(ValueError, match="fewer than one generation round"):
        PromptSampler(3, 2, 0, 2, seed=0)


# ---- files and rows that fail late or unclearly in datasets / jinja (PROBE: "Dataset files")

@pytest.mark.parametrize("name, text, why", [
    ("rows.jsonl", "", "is empty"),  # datasets: a bare StopIteration
    ("rows.jsonl", "\n  \n", "is empty"),
    ("rows.csv", "prompt,teacher_prompt\n", "has a header line but no rows"),  # datasets: "corresponds to no data"
    ("rows.json", "[ ]\n", "is an empty JSON list"),
])
def test_a_data_file_without_rows_is_named(tmp_path, name, text, why):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"No prompt rows: {path} {why}. Add rows"):
        load_prompt_dataset(str(path))


def test_an_empty_file_beside_others_is_fine(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text(DEMO_TRAIN.read_text())
    assert len(load_prompt_dataset(str(tmp_path))) == len(load_prompt_dataset(str(DEMO_TRAIN)))


def test_chat_messages_without_role_or_content_are_named_with_their_row(tokenizer):
    # from_list gives every message every key seen in the column: a message with only `text` gets role=None
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "Add 2 and 3."}]},
                              {"prompt": [{"text": "Add 4 and 5."}]}])
    rows = rows.add_column("teacher_prompt", rows["prompt"])
    with pytest.raises(ValueError, match=r"Row 1: column 'prompt' must be a list of \{'role', 'content'\} messages; "
                                         r"message 0 is \{'role': None"):
        tokenize_prompts(rows, tokenizer, 64, 64)


def test_a_prompt_that_ends_with_the_assistant_is_refused(tokenizer):
    chat = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    rows = Dataset.from_dict({"prompt": [[chat[0]], chat], "privileged_context": ["5", "5"]})
    with pytest.raises(ValueError, match="Row 1: column 'prompt' ends with an assistant message.*End the prompt "
                                         "with the user's turn"):
        tokenize_prompts(with_teacher_prompts(rows, "{prompt} {privileged_context}"), tokenizer, 64, 64)


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    from sdft_ds.assets import model_dir

    (tmp_path / "config.json").write_text((model_dir("tiny-qwen2-student") / "config.json").read_text())
    with pytest.raises(ValueError, match=f"student folder {tmp_path} has no tokenizer files"):
        load_tokenizer(tmp_path, role="student")  # transformers builds a 1-token tokenizer from it


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_a_tokenizer_path_that_does_not_exist_is_named(path):
    with pytest.raises(FileNotFoundError, match=f"no such folder: {path} \\(tokenizer\\)"):
        load_tokenizer(path)
