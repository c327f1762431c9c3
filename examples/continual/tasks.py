"""The synthetic world of the continual-learning study: skills, documents, eval sets, tokenizer, model config.

Every text is lowercase letters, digits and a few symbols, one token per character, so a model of a few hundred
thousand parameters can learn the skills exactly. A prompt ends with '='; its answer follows and ends with <eos>.

Prior skills (pretraining teaches them):
    reverse  'reverse kbdq=' -> 'qdbk'
    count    'count a in abcab=' -> '2'
    add      'add 17 8=' -> '25'
    lookup   'k=3 b=7 q=1;b?=' -> '7'
In-context learning (pretraining teaches it too): a document may hold a worked example of a skill before a new
instance ('reverse ab=ba\\nreverse kbdq=qdbk'), or the very instance answered once before it is asked again, for a
prior skill or for a made-up task whose answer can only be copied ('plok zu=qqa\\nplok zu=qqa'). The second form is
the SDFT teacher prompt: the prompt plus one demonstration of its answer (the paper's teacher sees the expert's
answer to the same question).

New skill (never in pretraining): ends  'ends kbdq=' -> 'kq' (the word's first and last letter).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

PAD, EOS = "<pad>", "<eos>"
ALPHABET = string.ascii_lowercase + string.digits + " =?;\n"
LETTERS = string.ascii_lowercase
PRIOR_SKILLS = ("reverse", "count", "add", "lookup")
NEW_SKILL = "ends"


def _word(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def reverse(rng):
    w = _word(rng)
    return f"reverse {w}=", w[::-1]


def count(rng):
    s = "".join(rng.choice("abc") for _ in range(rng.randint(3, 7)))
    c = rng.choice("abc")
    return f"count {c} in {s}=", str(s.count(c))


def add(rng):
    a, b = rng.randint(0, 29), rng.randint(0, 29)
    return f"add {a} {b}=", str(a + b)


def lookup(rng):
    keys = rng.sample(LETTERS, 3)
    values = [rng.choice(string.digits) for _ in keys]
    k = rng.choice(keys)
    pairs = " ".join(f"{key}={value}" for key, value in zip(keys, values))
    return f"{pairs};{k}?=", values[keys.index(k)]


def ends(rng):
    w = _word(rng)
    return f"ends {w}=", w[0] + w[-1]


SKILLS = {"reverse": reverse, "count": count, "add": add, "lookup": lookup, "ends": ends}


def demonstrated(prompt: str, answer: str) -> str:
    """The teacher prompt: the prompt answered once (the demonstration), then asked again."""
    return f"{prompt}{answer}\n{prompt}"


def worked_example(rng, skill: str) -> tuple[str, str]:
    """An in-context prompt: a worked example of the skill, then a new instance of it."""
    example_prompt, example_answer = SKILLS[skill](rng)
    prompt, answer = SKILLS[skill](rng)
    return f"{example_prompt}{example_answer}\n{prompt}", answer


def unknown(rng):
    """An instance of a task the model cannot compute (a made-up name, an arbitrary answer): shown answered once and
    asked again, the only way to get it right is to copy the demonstration, which is the teacher's job in SDFT."""
    name = _word(rng)
    while name == NEW_SKILL:  # the new skill stays unseen
        name = _word(rng)
    return f"{name} {_word(rng)}=", _word(rng, 1, 6)


def pretraining_document(rng) -> str:
    """One pretraining text: a prior skill directly (35 %), after a worked example (25 %), after its own answer
    (10 %); or an unknown task after its own answer (30 %)."""
    form = rng.random()
    skill = rng.choice(PRIOR_SKILLS)
    if form < 0.35:
        prompt, answer = SKILLS[skill](rng)
    elif form < 0.6:
        prompt, answer = worked_example(rng, skill)
    else:
        prompt, answer = SKILLS[skill](rng) if form < 0.7 else unknown(rng)
        prompt = demonstrated(prompt, answer)
    return prompt + answer + EOS


# ------------------------------------------------------------ eval sets (fixed, from their own seed)

EVAL_SEED = 12345
EVAL_ROWS = 64


def eval_rows(skill: str, icl: bool = False, rows: int = EVAL_ROWS, seed: int = EVAL_SEED) -> list[dict]:
    """Eval rows of one skill: plain prompts, or worked-example prompts (`icl`). Seeded by skill name, so each set
    is the same whatever else is generated. A prior skill's prompts may well occur in pretraining (its eval measures
    what the model knew); the new skill's are kept out of its demonstrations (training_rows)."""
    rng = random.Random(f"{seed}-{skill}-{icl}")
    out = []
    for _ in range(rows):
        prompt, answer = worked_example(rng, skill) if icl else SKILLS[skill](rng)
        out.append({"prompt": prompt, "answer": answer, "skill": skill})
    return out


def training_rows(rows: int, seed: int, exclude: set[str]) -> list[dict]:
    """Demonstrations of the new skill: prompt, teacher prompt (prompt + its demonstration) and the reference
    completion (for SFT). Prompts in `exclude` (the eval set's) are never used."""
    rng = random.Random(f"train-{seed}")
    out, seen = [], set(exclude)
    while len(out) < rows:
        prompt, answer = SKILLS[NEW_SKILL](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "teacher_prompt": demonstrated(prompt, answer), "completion": answer,
                    "answer": answer})
    return out


# A pretraining document may go on after an answer ('\n' and another instance), so the model may too: an answer is
# right when it is the completion's first line.
FIRST_LINE = {"metric": "regex", "pattern": "^{answer}(\n|$)", "max_new_tokens": 12}


def eval_spec() -> list[dict]:
    """The eval sets of the study (sdft_ds.evaluate.EvalSet fields): the new skill, each prior skill, and in-context
    learning of the prior skills (a worked example first)."""
    sets = [{"name": NEW_SKILL, "path": f"{NEW_SKILL}.jsonl", "role": "new", **FIRST_LINE}]
    sets += [{"name": s, "path": f"{s}.jsonl", "role": "prior", **FIRST_LINE} for s in PRIOR_SKILLS]
    sets += [{"name": f"icl-{s}", "path": f"icl-{s}.jsonl", "role": "prior", **FIRST_LINE} for s in PRIOR_SKILLS]
    return sets


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_eval_sets(folder: Path, rows: int = EVAL_ROWS) -> Path:
    """Every eval set as <name>.jsonl plus eval_sets.json (the harness's spec) in `folder`; returns the spec."""
    new = eval_rows(NEW_SKILL, rows=rows)
    write_jsonl(new, folder / f"{NEW_SKILL}.jsonl")
    for skill in PRIOR_SKILLS:
        write_jsonl(eval_rows(skill, rows=rows), folder / f"{skill}.jsonl")
        write_jsonl(eval_rows(skill, icl=True, rows=rows), folder / f"icl-{skill}.jsonl")
    spec = folder / "eval_sets.json"
    spec.write_text(json.dumps({"eval_sets": eval_spec()}, indent=1), encoding="utf-8")
    # The SDFT teacher's view of the new skill: the prompt with its demonstration. Not a skill to keep; a check
    # that the teacher knows the answers the student is to learn.
    write_jsonl([{**r, "prompt": demonstrated(r["prompt"], r["answer"])} for r in new],
                folder / f"teacher-{NEW_SKILL}.jsonl")
    check = [{"name": f"teacher-{NEW_SKILL}", "path": f"teacher-{NEW_SKILL}.jsonl", "role": "new", **FIRST_LINE}]
    (folder / "teacher_check.json").write_text(json.dumps({"eval_sets": check}, indent=1), encoding="utf-8")
    return spec


# ------------------------------------------------------------ tokenizer and model


def build_tokenizer():
    """One token per character of ALPHABET, <pad> = 0, <eos> = 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(ALPHABET)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS)
    tokenizer.padding_side = "left"
    return tokenizer


def model_config(tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 16), num_key_value_heads=max(1, hidden // 16),
                       intermediate_size=4 * hidden, max_position_embeddings=128, tie_word_embeddings=True,
                       pad_token_id=0, eos_token_id=1, bos_token_id=1)
