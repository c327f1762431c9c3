"""Prompt data: loading, validation and tokenisation, all before any engine is built.

A row holds `prompt` (what the student sees) and `teacher_prompt` (the same request with privileged context),
each a string or a list of chat messages; for SFT, `prompt` and its reference `completion`. Bad rows fail here,
naming the row and the fix, so that a mistake never costs a model load or a GPU allocation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_ROWS_NAMED = 5


def load_prompt_dataset(source, split: str = "train") -> Dataset:
    """A `Dataset`, a `DatasetDict` (its `split`), local json/jsonl/parquet/csv files, or a hub name."""
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"The DatasetDict has no split {split!r}; it has {sorted(source)}. Pass the split "
                             "you want, e.g. dataset['train'].")
        return source[split]
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, Path)):
        paths = [Path(p) for p in str(source).split(",")]
        if all(p.exists() for p in paths):
            files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])
                     if f.suffix in LOCAL_FORMATS]
            if not files:
                raise ValueError(f"No .json/.jsonl/.parquet/.csv file found in {source!r}.")
            kinds = {LOCAL_FORMATS[f.suffix] for f in files}
            if len(kinds) > 1:
                raise ValueError(f"{source!r} mixes file formats {sorted(kinds)}; use one format.")
            empty = {f: why for f in files if (why := _no_rows(f))}
            if len(empty) == len(files):  # datasets' words for it: a bare StopIteration, or "corresponds to no data"
                raise ValueError("No prompt rows: " + "; ".join(f"{f} {why}" for f, why in empty.items()) + ". Add "
                                 "rows with 'prompt' and 'teacher_prompt' (one JSON object per line in a .jsonl).")
            return load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
        return load_dataset(str(source), split=split)
    raise TypeError(f"train_dataset must be a datasets.Dataset, DatasetDict, path or hub name; got "
                    f"{type(source).__name__}.")


def _no_rows(file: Path) -> str | None:
    """Why a local data file holds no rows, or None."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq  # datasets' own dependency

        return "has no rows" if pq.ParquetFile(file).metadata.num_rows == 0 else None
    with file.open(encoding="utf-8", errors="replace") as handle:
        head = handle.read(1 << 16)
    whole = len(head) < 1 << 16  # the rules below hold only if the whole file was read
    lines = [line for line in head.splitlines() if line.strip()]
    if whole and not lines:
        return "is empty"
    if whole and file.suffix == ".csv" and len(lines) == 1:
        return "has a header line but no rows"
    if "".join(head.split()) == "[]":
        return "is an empty JSON list"
    return None


def is_conversation(value) -> bool:
    return isinstance(value, list)


def _check_text(value, column: str, row: int) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"Row {row}: column {column!r} is empty. Remove the row or fill it in.")
        return
    if isinstance(value, list):
        if not value:
            raise ValueError(f"Row {row}: column {column!r} is an empty conversation.")
        for i, message in enumerate(value):
            # Dataset.from_list gives every message all the keys any message has, None where it had none
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or message.get("content") is None:
                raise ValueError(f"Row {row}: column {column!r} must be a list of {{'role', 'content'}} messages; "
                                 f"message {i} is {message!r}. Give every message a role and a content.")
        if not any(str(m["content"]).strip() for m in value):
            raise ValueError(f"Row {row}: column {column!r} has only empty messages.")
        if value[-1]["role"] == "assistant":
            raise ValueError(f"Row {row}: column {column!r} ends with an assistant message, so the model would be "
                             "asked to continue an assistant turn instead of answering. End the prompt with the "
                             "user's turn (the answer, if any, belongs in privileged_context or answer).")
        return
    raise ValueError(f"Row {row}: column {column!r} must be a string or a list of chat messages, not "
                     f"{type(value).__name__}.")


def _text_of(content) -> str:
    """A message's text: a string as it is; a list of parts (multimodal messages), its text parts joined by spaces."""
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content
                        if isinstance(part, dict) and part.get("type") == "text")
    return str(content)


def context_text(privileged_context) -> str:
    """The privileged context as text, as TRL reads it: a string as it is, a list of messages as their non-empty
    texts one per line."""
    if isinstance(privileged_context, str):
        return privileged_context
    if isinstance(privileged_context, list) and all(isinstance(m, dict) for m in privileged_context):
        return "\n".join(text for m in privileged_context if (text := _text_of(m.get("content", ""))))
    if privileged_context is None:
        raise ValueError("privileged_context is missing (None).")
    return str(privileged_context)


def teacher_prompt(prompt, privileged_context, template: str):
    """The teacher's prompt (TRL's dataset shape): `template` filled with the prompt and the privileged context. A
    conversation keeps its earlier messages; its last one (the user's question) holds the filled template."""
    context = context_text(privileged_context)
    if not is_conversation(prompt):
        return template.format(prompt=prompt, privileged_context=context)
    if not prompt or not isinstance(prompt[-1], dict):
        return prompt  # validate_rows refuses it, naming the row
    *history, last = prompt  # an assistant turn last is refused by validate_rows as well
    return [*history, {**last, "content": template.format(prompt=_text_of(last.get("content", "")),
                                                           privileged_context=context)}]


def with_teacher_prompts(dataset: Dataset, template: str) -> Dataset:
    """Build `teacher_prompt` from `prompt` and `privileged_context` when the dataset has none (TRL's dataset shape);
    a `teacher_prompt` column (the authors' shape) is used as it is."""
    columns = set(dataset.column_names)
    if "prompt" not in columns:
        raise ValueError(f"The dataset needs a 'prompt' column; it has {sorted(columns)}.")
    if "teacher_prompt" in columns:
        return dataset
    if "privileged_context" not in columns:
        raise ValueError("The dataset needs a 'teacher_prompt' column, or a 'privileged_context' column to build "
                         f"it from with teacher_prompt_template; it has {sorted(columns)}. Without distinct "
                         "teacher prompts, set teacher_prompt = prompt.")

    def build(row, index):
        try:
            return {"teacher_prompt": teacher_prompt(row["prompt"], row["privileged_context"], template)}
        except ValueError as error:
            raise ValueError(f"Row {index}: {error}") from None

    return dataset.map(build, with_indices=True)


def with_completions(dataset: Dataset) -> Dataset:
    """SFT's rows: `prompt` and its reference `completion`. The teacher prompt, which SFT never reads, is set to the
    prompt: a MicroBatch carries one."""
    columns = set(dataset.column_names)
    if "prompt" not in columns:
        raise ValueError(f"The dataset needs a 'prompt' column; it has {sorted(columns)}.")
    if "completion" not in columns:
        raise ValueError(f"method='sft' trains on each row's reference 'completion' after its 'prompt', and the "
                         f"dataset has no 'completion' column; it has {sorted(columns)}. Add one (text, or an "
                         "assistant message for chat prompts), e.g. dataset.rename_column('answer', 'completion').")
    return dataset.map(lambda row: {"teacher_prompt": row["prompt"]})


def _assistant_turn(prompt, completion, row: int) -> list[dict] | str:
    """A row's completion checked against its prompt: text after a text prompt; after a chat prompt, assistant
    messages (a text completion is one)."""
    where = f"Row {row}: column 'completion'"
    if isinstance(completion, str):
        if not completion.strip():
            raise ValueError(f"{where} is empty. Remove the row or fill it in.")
        return [{"role": "assistant", "content": completion}] if is_conversation(prompt) else completion
    messages = [completion] if isinstance(completion, dict) else completion
    if not is_conversation(prompt) or not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") == "assistant" and m.get("content") is not None for m in messages):
        raise ValueError(f"{where} must be text, or (after a chat prompt) assistant messages {{'role': 'assistant', "
                         f"'content': ...}}; got {completion!r}.")
    return messages


def tokenize_completions(dataset: Dataset, tokenizer, max_completion_length: int,
                         chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each row's reference completion as they follow its prompt's, cut to max_completion_length (a
    cut one has no EOS and counts as truncated). A text completion ends with EOS; after a chat prompt, the
    assistant turn is what the chat template renders after the generation prompt, its end-of-turn token included."""
    rows = []
    for row, (prompt, completion) in enumerate(zip(dataset["prompt"], dataset["completion"])):
        turn = _assistant_turn(prompt, completion, row)
        if isinstance(turn, str):
            rows.append(tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            continue
        kwargs = chat_template_kwargs or {}
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
        whole = tokenizer.apply_chat_template([*prompt, *turn], tokenize=False, **kwargs)
        if not whole.startswith(head):
            raise ValueError(f"Row {row}: the chat template renders the prompt with its completion otherwise than the "
                             "prompt alone with a generation prompt, so the completion's tokens cannot be cut out. "
                             "Give prompt and completion as text.")
        rows.append(tokenizer(whole[len(head):], add_special_tokens=False)["input_ids"])
    over = [i for i, ids in enumerate(rows) if len(ids) > max_completion_length]
    if over:
        logger.warning("%d reference completion(s) exceed max_completion_length=%d tokens and are cut (rows %s); "
                       "the cut ones train without their end.", len(over), max_completion_length, _named(over))
    return [ids[:max_completion_length] for ids in rows]


def validate_rows(dataset) -> None:
    """`dataset`: anything with `prompt` and `teacher_prompt` columns (a Dataset, a dict of lists)."""
    if len(dataset["prompt"]) == 0:
        raise ValueError("The dataset is empty.")
    for row, (prompt, teacher_prompt) in enumerate(zip(dataset["prompt"], dataset["teacher_prompt"])):
        _check_text(prompt, "prompt", row)
        _check_text(teacher_prompt, "teacher_prompt", row)


def load_tokenizer(name_or_path, role: str = "tokenizer"):
    """A tokenizer by path or hub name; one without a pad token pads with its EOS (the mask ends at the first EOS,
    so pad = EOS is safe). `role` names the setting in errors."""
    from transformers import AutoTokenizer  # here: `import sdft_ds.data` need not load transformers

    from sdft_ds.models import TOKENIZER_FILES, hub_errors, pretrained_source, ships_tokenizer

    name = pretrained_source(name_or_path, role)
    if not ships_tokenizer(name):  # transformers would build a 1-token tokenizer from the config alone
        raise ValueError(f"{role} folder {name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}). Save the "
                         "tokenizer into it (tokenizer.save_pretrained), or name one with tokenizer_name_or_path.")
    with hub_errors(name, role):
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token. Set one before training, e.g. "
                         "`tokenizer.pad_token = tokenizer.eos_token` (as the Quick Start does).")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; completions could never end. Set tokenizer.eos_token.")


def encode(tokenizer, value, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template with a generation prompt."""
    if is_conversation(value):
        if tokenizer.chat_template is None:
            raise ValueError("A conversational prompt needs a tokenizer with a chat template; this tokenizer has "
                             "none. Set tokenizer.chat_template or pass plain-string prompts.")
        text = tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=False,
                                             **(chat_template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(value)["input_ids"]


@dataclass
class TokenizedPrompts:
    """Token ids per row within their limits (prompts cut from the left, teacher prompts inside their privileged
    context), with the rows that were cut."""

    prompt_ids: list[list[int]]
    teacher_prompt_ids: list[list[int]]
    truncated_rows: frozenset[int]
    truncated_teacher_rows: frozenset[int]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _left_truncate(rows: list[list[int]], limit: int, column: str) -> tuple[list[list[int]], frozenset[int]]:
    over = [i for i, ids in enumerate(rows) if len(ids) > limit]
    if over:
        logger.warning("%d %s(s) exceed %d tokens and are cut from the left (rows %s). Raise the limit if the "
                       "start of the prompt matters.", len(over), column, limit, _named(over))
    return [ids[-limit:] for ids in rows], frozenset(over)


def _named(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:MAX_ROWS_NAMED])) + (" ..." if len(rows) > MAX_ROWS_NAMED else "")


def _replace_last(text: str, old: str, new: str) -> str:
    i = text.rindex(old)
    return text[:i] + new + text[i + len(old):]


def _holds(value, context: str) -> bool:
    if is_conversation(value):
        return any(context in str(m["content"]) for m in value)
    return context in value


def _with_context(value, context: str, shorter: str):
    """The teacher prompt (text or chat) with the last occurrence of its privileged context replaced."""
    if not is_conversation(value):
        return _replace_last(value, context, shorter)
    messages = [dict(m) for m in value]
    for message in reversed(messages):
        if context in str(message["content"]):
            message["content"] = _replace_last(str(message["content"]), context, shorter)
            break
    return messages


def _cut_context(value, context: str, tokenizer, limit: int, chat_template_kwargs) -> list[int] | None:
    """The teacher prompt's ids with its privileged context cut from the end until they fit (the question and the
    template's framing stay whole); None when even an empty context does not fit."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]

    def ids(keep: int) -> list[int]:
        return encode(tokenizer, _with_context(value, context, tokenizer.decode(context_ids[:keep])),
                      chat_template_kwargs)

    if len(ids(0)) > limit:
        return None
    fits, over = 0, len(context_ids) + 1  # the longest fitting cut, by bisection
    while over - fits > 1:
        middle = (fits + over) // 2
        fits, over = (middle, over) if len(ids(middle)) <= limit else (fits, middle)
    return ids(fits)


def _fit_teacher_prompts(values: list, contexts: list, rows: list[list[int]], tokenizer, limit: int,
                         chat_template_kwargs) -> tuple[list[list[int]], frozenset[int]]:
    """Teacher prompts over the limit lose the end of their privileged context, not their start: cut from the
    left, the question would go first and the demonstration stay (SPEC §4). Rows whose context cannot be found
    in the teacher prompt are refused."""
    over = [i for i, ids in enumerate(rows) if len(ids) > limit]
    rows, refused = list(rows), []
    for i in over:
        context = contexts[i]
        found = isinstance(context, str) and context.strip() and _holds(values[i], context)
        fitted = _cut_context(values[i], context, tokenizer, limit, chat_template_kwargs) if found else None
        if fitted is None:
            refused.append(i)
        else:
            rows[i] = fitted
    if refused:
        raise ValueError(f"{len(refused)} teacher_prompt(s) exceed max_teacher_prompt_length={limit} tokens (rows "
                         f"{_named(refused)}) and sdft_ds cannot cut them without cutting the question or finding the "
                         "demonstration: they have no privileged_context column value that occurs in the teacher "
                         "prompt, or the question alone is too long. Raise max_teacher_prompt_length, shorten those "
                         "rows, or give the demonstration in a 'privileged_context' column (it is then cut from its "
                         "end).")
    if over:
        logger.warning("%d teacher_prompt(s) exceed %d tokens; their privileged_context is cut from its end (rows "
                       "%s). Raise max_teacher_prompt_length to keep the whole demonstration.", len(over), limit,
                       _named(over))
    return rows, frozenset(over)


def tokenize_prompts(dataset: Dataset, tokenizer, max_prompt_length: int, max_teacher_prompt_length: int,
                     chat_template_kwargs: dict | None = None) -> TokenizedPrompts:
    check_tokenizer(tokenizer)
    validate_rows(dataset)
    prompts = [encode(tokenizer, p, chat_template_kwargs) for p in dataset["prompt"]]
    teacher_values = dataset["teacher_prompt"]
    teacher_prompts = [encode(tokenizer, p, chat_template_kwargs) for p in teacher_values]
    prompts, cut = _left_truncate(prompts, max_prompt_length, "prompt")
    contexts = ([None if c is None else context_text(c) for c in dataset["privileged_context"]]
                if "privileged_context" in dataset.column_names else [None] * len(prompts))
    teacher_prompts, teacher_cut = _fit_teacher_prompts(teacher_values, contexts, teacher_prompts, tokenizer,
                                                        max_teacher_prompt_length, chat_template_kwargs)
    return TokenizedPrompts(prompts, teacher_prompts, cut, teacher_cut)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both [len(rows), longest], real tokens flush right so generation appends."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


class PromptSampler:
    """Seeded, rank-disjoint order of prompt indices, epoch after epoch; its position is resumable state."""

    def __init__(self, num_rows: int, prompts_per_rank: int, rank: int, world_size: int, seed: int):
        self.num_rows, self.prompts_per_rank = num_rows, prompts_per_rank
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rounds_per_epoch = num_rows // (prompts_per_rank * world_size)
        if self.rounds_per_epoch == 0:
            raise ValueError(f"The dataset has {num_rows} prompts, fewer than one generation round needs "
                             f"({prompts_per_rank} per rank × {world_size} ranks). Add rows or lower "
                             "per_device_train_batch_size / steps_per_generation.")
        self.rounds_done = 0

    def next_round(self) -> list[int]:
        epoch, index = divmod(self.rounds_done, self.rounds_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        start = (index * self.world_size + self.rank) * self.prompts_per_rank
        self.rounds_done += 1
        return order[start:start + self.prompts_per_rank].tolist()

    def state_dict(self) -> dict:
        return {"rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict) -> None:
        self.rounds_done = state["rounds_done"]
