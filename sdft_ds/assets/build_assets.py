"""Regenerate every offline asset: demo dataset, BPE tokenizer, three tiny warmed-up models.

    cd /work/main && PYTHONPATH=. python -m sdft_ds.assets.build_assets
    # or: python sdft_ds/assets/build_assets.py

No hub is reachable from tests or CI, so the data, tokenizer and models are made here from fixed
seeds on CPU (about a minute on 2 cores) and committed. Same machine, same bytes; other machines
may differ in the last float bits of the weights, which nothing relies on.
"""

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make `sdft_ds` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from sdft_ds.assets import (
    DEMO_DIR,
    DEMO_HELDOUT,
    DEMO_HELDOUT_CHAT,
    DEMO_TRAIN,
    DEMO_TRAIN_CHAT,
    MODELS_DIR,
    TOKENIZER_DIR,
    model_dir,
)

SEED = 0
N_TRAIN, N_HELDOUT = 320, 32
VOCAB_SIZE = 1024
MAX_POSITIONS = 512
BATCH = 16  # warm-up sequences per step
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML as in Qwen2, minus Qwen2's default system message: a rendered prompt holds only what the
# row says, which keeps sequences short and the string and chat forms of a row identical.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The demonstration wording of the SDFT paper's teacher prompt.
TEACHER_TEMPLATE = (
    "{prompt}\n\nThis is an example for a response to the question:\n{answer}\n\n"
    "Now answer with a response of your own."
)

WORDS = """
apple anchor badge banner basket beach berry blanket bottle branch bridge bucket butter cabin
camel candle canvas carpet castle cattle cherry circle cloud copper cotton crayon desert dinner
dragon drum eagle engine falcon feather fence forest fossil garden ginger glove granite harbor
helmet hollow island jacket jelly jungle kettle kitten ladder lantern lemon lizard magnet marble
meadow mirror monkey needle orange oyster paddle pencil pepper pillow planet pocket puzzle rabbit
ribbon river rocket saddle salmon shadow silver spider spoon stone summer sunset tablet thunder
ticket tiger timber tomato tunnel turtle velvet violin wagon walnut window winter wizard yellow
zebra acorn bread chalk daisy flame grape honey lotus maple north ocean pearl quilt robin
""".split()


# Each skill turns an RNG into (prompt, answer). They are small, exact and answerable without
# knowledge, so a demonstration in context visibly helps a model that has not learned the skill.
def _reverse(rng):
    w = rng.choice(WORDS)
    return f"Reverse the word '{w}'.", w[::-1]


def _uppercase(rng):
    w = rng.choice(WORDS)
    return f"Uppercase: '{w}'", w.upper()


def _add(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"Add {a} and {b}.", str(a + b)


def _subtract(rng):
    b = rng.randint(2, 40)
    a = rng.randint(b + 1, 90)
    return f"Subtract {b} from {a}.", str(a - b)


def _count_letters(rng):
    w = rng.choice(WORDS)
    return f"How many letters are in '{w}'?", str(len(w))


def _last_letter(rng):
    w = rng.choice(WORDS)
    return f"What is the last letter of '{w}'?", w[-1]


def _sort_letters(rng):
    w = rng.choice(WORDS)
    return f"Sort the letters of '{w}' alphabetically.", "".join(sorted(w))


def _repeat(rng):
    w = rng.choice(WORDS)
    return f"Repeat '{w}' three times.", " ".join([w] * 3)


SKILLS = {
    "reverse": _reverse,
    "uppercase": _uppercase,
    "add": _add,
    "subtract": _subtract,
    "count_letters": _count_letters,
    "last_letter": _last_letter,
    "sort_letters": _sort_letters,
    "repeat": _repeat,
}


def draw_rows(rng: random.Random, n: int, exclude=(), unique: bool = True) -> list[dict]:
    """Draw n rows, skills round-robin so each is equally represented, skipping `exclude` prompts.

    `unique` forbids repeated prompts (the committed splits); the teacher's warm-up stream needs
    more rows than there are distinct word prompts, so it allows repeats.
    """
    rows, seen = [], set(exclude)
    names = list(SKILLS)
    while len(rows) < n:
        skill = names[len(rows) % len(names)]
        prompt, answer = SKILLS[skill](rng)
        if prompt in seen:
            continue
        if unique:
            seen.add(prompt)
        rows.append({
            "prompt": prompt,
            "teacher_prompt": TEACHER_TEMPLATE.format(prompt=prompt, answer=answer),
            "privileged_context": answer,
            "answer": answer,
            "skill": skill,
        })
    return rows


def to_chat(row: dict) -> dict:
    """Conversational form of a row: prompts become single user turns, other fields unchanged."""
    return {
        **row,
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "teacher_prompt": [{"role": "user", "content": row["teacher_prompt"]}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the dataset text and the ChatML role headers.

    Specials come first so their ids are 0, 1, 2. The role headers are fed without the special
    markers: BPE training does not treat those as atomic and would waste merges on their pieces.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = []
    for row in rows:
        corpus += [f"user\n{row['prompt']}", f"user\n{row['teacher_prompt']}", f"assistant\n{row['answer']}"]
    corpus.append("system\nYou are a helpful assistant.")
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def encode(tok: PreTrainedTokenizerFast, rows: list[dict], prompt_key: str) -> torch.Tensor:
    """Chat-formatted `prompt_key` turn + answer<|im_end|> per row, right-padded: (N, T) ids.

    Right padding needs no attention mask: causal attention never looks ahead.
    """
    seqs = []
    for row in rows:
        chat = [{"role": "user", "content": row[prompt_key]}]
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        seqs.append(tok(prompt + row["answer"] + IM_END, add_special_tokens=False)["input_ids"])
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    return ids


def warm_up(model, ids: torch.Tensor, pad_id: int, steps: int, lr: float, seed: int) -> tuple[float, float]:
    """Plain next-token training on whole sequences (AdamW, fp32, warm-up then cosine decay).

    Rows are visited in seeded shuffled epochs; padding is the only thing masked out of the loss.
    Returns the mean loss of the first and last 10 steps.
    """
    g = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * BATCH / len(ids))
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(epochs)])
    labels = ids.masked_fill(ids == pad_id, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    for step in range(steps):
        idx = order[step * BATCH : (step + 1) * BATCH]
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


# The teacher learns the task from teacher_prompt + answer so that it learns to read the
# demonstration; it trains on a fresh stream of rows (held-out prompts excluded) because on the
# 320 committed rows it memorises answers instead. The students get a short run on prompt + answer
# from the train split: they learn the format but stay imperfect, leaving SDFT room to help.
# Steps are sized for at most about 30 s per model on 2 idle cores.
QWEN2 = dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
MODEL_SPECS = {
    "tiny-qwen2-student": dict(
        arch=dict(QWEN2, hidden_size=64, num_hidden_layers=2, intermediate_size=128),
        prompt_key="prompt", fresh_stream=False, steps=300, lr=3e-3,
    ),
    "tiny-qwen2-teacher": dict(
        arch=dict(QWEN2, hidden_size=96, num_hidden_layers=3, intermediate_size=192),
        prompt_key="teacher_prompt", fresh_stream=True, steps=320, lr=5e-3,
    ),
    "tiny-llama": dict(
        arch=dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=False),
        prompt_key="prompt", fresh_stream=False, steps=300, lr=3e-3,
    ),
}


def build_model(name: str, tok: PreTrainedTokenizerFast, rows: list[dict], seed: int) -> None:
    """Initialise from a seeded config, warm up on `rows`, save weights, tokenizer, generation config."""
    spec = MODEL_SPECS[name]
    arch = dict(spec["arch"])
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        **arch,
        vocab_size=len(tok),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    t0 = time.perf_counter()
    ids = encode(tok, rows, spec["prompt_key"])
    first, last = warm_up(model, ids, tok.pad_token_id, spec["steps"], spec["lr"], seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params:,} params, {spec['steps']} steps on {len(rows)} rows of "
          f"{spec['prompt_key']} + answer, loss {first:.3f} -> {last:.3f}, {time.perf_counter() - t0:.1f}s")
    # Stop on either end marker, as Qwen2-Instruct's generation config does.
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
        do_sample=True,
    )
    out = model_dir(name)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(2)  # fixed, since the thread count can change float reduction order
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)

    rows = draw_rows(rng, N_TRAIN + N_HELDOUT)
    train, heldout = rows[:N_TRAIN], rows[N_TRAIN:]
    rng.shuffle(train)
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    write_jsonl(DEMO_TRAIN, train)
    write_jsonl(DEMO_TRAIN_CHAT, [to_chat(r) for r in train])
    write_jsonl(DEMO_HELDOUT, heldout)
    write_jsonl(DEMO_HELDOUT_CHAT, [to_chat(r) for r in heldout])

    tok = build_tokenizer(rows)
    shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)
    tok.save_pretrained(TOKENIZER_DIR)
    print(f"tokenizer: {len(tok)} tokens, pad={tok.pad_token_id} eos={tok.eos_token_id} "
          f"im_start={tok.convert_tokens_to_ids(IM_START)}")

    shutil.rmtree(MODELS_DIR, ignore_errors=True)
    heldout_prompts = {r["prompt"] for r in heldout}
    for i, (name, spec) in enumerate(MODEL_SPECS.items()):
        warm_rows = train
        if spec["fresh_stream"]:  # one new row per warm-up sample
            warm_rows = draw_rows(rng, spec["steps"] * BATCH, exclude=heldout_prompts, unique=False)
        build_model(name, tok, warm_rows, seed=SEED + 1 + i)
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
