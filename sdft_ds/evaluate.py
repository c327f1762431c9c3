"""Forgetting harness: score saved Hugging Face checkpoints on eval sets, one result row per (checkpoint, eval set),
and tabulate new-skill accuracy against each prior skill and their average, as the SDFT paper reports them.

    python -m sdft_ds.evaluate --model outputs/stage1 --stage "SDFT stage 1" \
        --eval-sets examples/eval_sets_example.yaml --results outputs/forgetting.jsonl

Another run with another --stage appends to the same results file, and the printed table holds every stage so far
(the sequential setting: stage 1 -> stage 2 -> ...). Plain transformers `generate` on one device: evaluating a
saved checkpoint needs no DeepSpeed. Every input error (spec, data file, column, metric, model folder) is raised
before any model is loaded.

Metrics, each giving a score in [0, 1] so that prior skills average on one scale:
- exact_match: the completion decoded up to its first EOS, stripped, equals the stripped answer;
- regex: `re.search` finds the pattern in that completion; the pattern is the row's answer, or the eval set's
  `pattern` with `{answer}` standing for the row's answer, regex-escaped;
- loglik: teacher-forced on prompt + answer (+ EOS unless loglik_eos is false). `mean_loglik` is the mean over
  rows of each row's mean log-probability per reference token (nats); the score is the fraction of rows whose
  reference is the greedy continuation (every reference token is the argmax). The answer is tokenized on its own
  and appended to the prompt's tokens; the EOS position counts the probability of stopping (any EOS id).

An eval set may instead name an lm-eval task (`lm_eval_task`, with lm-eval installed: pip install 'sdft_ds[lm-eval]'):
lm-eval builds its prompts and scores them on the already loaded model, and one of its metrics (acc, exact_match, ...)
is the set's score, in the same table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from sdft_ds.data import encode, left_pad, load_tokenizer, validate_rows

# transformers and sdft_ds.models (which imports it) load inside functions: `--help` stays quick; lm_eval too, and
# everything but lm_eval_task sets works without it.

METRICS = ("exact_match", "regex", "loglik")
ROLES = ("new", "prior")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FILE_FIELDS = ("metric", "max_new_tokens", "sample", "temperature", "top_p", "seed", "pattern", "loglik_eos", "select")
LM_EVAL_FIELDS = ("lm_eval_include", "lm_eval_metric", "num_fewshot", "limit", "lm_eval_chat")
RESULT_FIELDS = ("checkpoint", "stage", "eval_set", "role", "metric", "score", "mean_loglik", "n", "unfinished",
                 "seconds")


@dataclass
class EvalSet:
    """One eval set: a local file of rows with `prompt` (a string, or chat messages rendered with the tokenizer's
    chat template) and `answer`, and how to score them."""

    name: str = field(metadata={"help": "Column label in the table, e.g. 'cipher'."})
    path: str | None = field(default=None, metadata={"help": ".jsonl, .json (a list of objects) or .csv file; "
                                                              "relative paths are read from the spec file's folder. "
                                                              "Give this or lm_eval_task."})
    metric: str = field(default="exact_match", metadata={"help": f"One of {', '.join(METRICS)}."})
    role: str = field(default="prior", metadata={"help": "'new' (the skill being taught) or 'prior' (one that "
                                                         "should not be forgotten)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation limit (exact_match, regex)."})
    sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with sample)."})
    seed: int = field(default=0, metadata={"help": "Seed set before the set's first batch (with sample); results "
                                                   "still depend on batch size and device."})
    pattern: str | None = field(default=None, metadata={"help": "regex only: the pattern to search for, "
                                                                "'{answer}' standing for the escaped answer; "
                                                                "unset, the answer itself is the pattern."})
    loglik_eos: bool = field(default=True, metadata={"help": "loglik only: score the EOS after the answer too (the "
                                                             "model must stop); false for base models."})
    select: dict | None = field(default=None, metadata={"help": "Keep only rows whose columns equal these values, "
                                                                "e.g. {skill: reverse}."})
    lm_eval_task: str | None = field(default=None, metadata={"help": "An lm-eval task to score instead of a file "
                                                                      "(pip install 'sdft_ds[lm-eval]'): lm-eval's "
                                                                      "own task config decides prompts, generation "
                                                                      "and metrics."})
    lm_eval_include: str | None = field(default=None, metadata={"help": "lm-eval: a folder of local task YAMLs "
                                                                         "(relative to the spec file), searched "
                                                                         "instead of lm-eval's own tasks (indexing "
                                                                         "those takes ~15 s)."})
    lm_eval_metric: str | None = field(default=None, metadata={"help": "lm-eval: the metric that is the score, e.g. "
                                                                        "acc, or metric,filter as in "
                                                                        "exact_match,strict-match; unset, the "
                                                                        "task's first."})
    num_fewshot: int | None = field(default=None, metadata={"help": "lm-eval: few-shot examples (unset: the "
                                                                     "task's own)."})
    limit: int | None = field(default=None, metadata={"help": "lm-eval: score only the first N documents."})
    lm_eval_chat: bool = field(default=False, metadata={"help": "lm-eval: render prompts with the tokenizer's "
                                                                "chat template (lm-eval's apply_chat_template)."})

    def __post_init__(self):
        where = f"eval set {self.name!r}"
        # A field that the other kind of set ignores is refused rather than silently dropped.
        other = FILE_FIELDS if self.lm_eval_task else LM_EVAL_FIELDS
        stray = [f.name for f in dataclasses.fields(self) if f.name in other and getattr(self, f.name) != f.default]
        if stray:
            raise ValueError(f"{where}: {', '.join(stray)} " + (
                "set with lm_eval_task; lm-eval's task config decides how it is prompted and scored." if
                self.lm_eval_task else "set without lm_eval_task; they are for lm-eval sets."))
        if (self.path is None) == (self.lm_eval_task is None):
            raise ValueError(f"{where}: " + ("path and lm_eval_task are both set; give one." if self.path else
                                             "give path (a file of rows) or lm_eval_task."))
        if (self.num_fewshot or 0) < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"{where}: num_fewshot={self.num_fewshot} must be at least 0 and limit={self.limit} at "
                             "least 1.")
        if self.metric not in METRICS:
            raise ValueError(f"{where}: unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}.")
        if self.role not in ROLES:
            raise ValueError(f"{where}: unknown role {self.role!r}; choose 'new' or 'prior'.")
        if self.max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens={self.max_new_tokens} must be at least 1.")
        if self.sample and self.metric == "loglik":
            raise ValueError(f"{where}: sample=true with metric loglik; loglik scores the given answer and samples "
                             "nothing. Drop sample.")
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"{where}: sampling needs temperature > 0 and 0 < top_p <= 1; got temperature="
                             f"{self.temperature}, top_p={self.top_p}.")
        if self.pattern is not None:
            if self.metric != "regex":
                raise ValueError(f"{where}: pattern is set but the metric is {self.metric}; pattern is for regex.")
            _compile(self.pattern.replace("{answer}", ""), f"{where}: pattern")


@dataclass
class Rows:
    """An eval set's rows, checked: prompts (strings or chat messages) and answers (strings)."""

    prompts: list
    answers: list[str]


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{where} {pattern!r} is not a valid regular expression: {error}.") from None


def read_eval_sets(spec_path) -> list[EvalSet]:
    """Eval sets from a YAML or JSON file: a list of eval sets, or a mapping with the list under `eval_sets`."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise FileNotFoundError(f"no such eval-set spec file: {spec_path}.")
    text = spec_path.read_text(encoding="utf-8")
    if spec_path.suffix == ".json":
        spec = json.loads(text)
    else:
        spec = yaml.safe_load(text)
    entries = spec.get("eval_sets") if isinstance(spec, dict) else spec
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{spec_path} must hold a non-empty list of eval sets (or one under 'eval_sets').")
    known = {f.name for f in dataclasses.fields(EvalSet)}
    sets = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or not ({"path", "lm_eval_task"} & set(entry)):
            raise ValueError(f"{spec_path}: eval set {i} must be a mapping with at least 'name' and 'path' (or "
                             f"'lm_eval_task'); got {entry!r}.")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{spec_path}: eval set {entry['name']!r} has unknown field(s) {unknown}; valid fields: "
                             f"{', '.join(sorted(known))}.")
        paths = {key: str(spec_path.parent / entry[key]) for key in ("path", "lm_eval_include")  # absolute: kept
                 if isinstance(entry.get(key), str)}
        sets.append(EvalSet(**{**entry, **paths}))
    names = [s.name for s in sets]
    if len(set(names)) < len(names):
        raise ValueError(f"{spec_path}: eval set names repeat ({names}); each names one table column.")
    return sets


def _read_records(path: Path) -> list[dict]:
    # Read here rather than with `datasets`: its CSV reader infers types, turning an answer '007' into 7.
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of objects.")
        return records
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .csv.")


def load_rows(spec: EvalSet) -> Rows:
    """The eval set's rows, every one checked, with errors that name the eval set and the row."""
    if spec.lm_eval_task:
        raise ValueError(f"eval set {spec.name!r} is lm-eval task {spec.lm_eval_task!r}, which has no rows file: "
                         "check it with lm_eval_key.")
    path, where = Path(spec.path), f"eval set {spec.name!r} ({spec.path})"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file.")
    records = _read_records(path)
    if records and not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{where}: every row must be an object with 'prompt' and 'answer'.")
    for column, value in (spec.select or {}).items():
        if records and column not in records[0]:
            raise ValueError(f"{where}: select names column {column!r}, which the file lacks; it has "
                             f"{sorted(records[0])}.")
        records = [r for r in records if str(r.get(column)) == str(value)]
    if not records:
        raise ValueError(f"{where}: no rows" + (f" with {spec.select}." if spec.select else "."))
    for column in ("prompt", "answer"):
        if column not in records[0]:
            raise ValueError(f"{where} needs a {column!r} column; it has {sorted(records[0])}.")
    prompts = [r.get("prompt") for r in records]
    try:  # validate_rows checks prompt and teacher_prompt; here both are the prompt
        validate_rows({"prompt": prompts, "teacher_prompt": prompts})
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    answers = []
    for i, answer in enumerate(r.get("answer") for r in records):
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: row {i}: 'answer' must be a non-empty string; got {answer!r}.")
        if spec.metric == "regex" and spec.pattern is None:
            _compile(answer, f"{where}: row {i}: answer")
        answers.append(answer)
    return Rows(prompts, answers)


# ------------------------------------------------------------ scoring (pure)


def exact_match(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def regex_match(completion: str, answer: str, pattern: str | None = None) -> bool:
    regex = answer if pattern is None else pattern.replace("{answer}", re.escape(answer))
    return re.search(regex, completion.strip()) is not None


def until_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """(the tokens before the first EOS, whether an EOS ended them)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i], True
    return ids, False


def reference_scores(logits, targets, scored, stop, eos_ids: list[int]):
    """Per row, (mean log-probability of its scored targets, whether each scored target is the argmax).

    logits: (B, M, V) predicting targets (B, M); scored: (B, M) bool; stop: (B, M) bool where the target is the
    EOS, scored as stopping at all: log Σ p(eos) over `eos_ids`, a hit when the argmax is any of them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    eos = torch.tensor(eos_ids, device=logits.device)
    token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token = torch.where(stop, torch.logsumexp(logprobs[..., eos], dim=-1), token)
    best = logprobs.argmax(-1)
    hit = torch.where(stop, torch.isin(best, eos), best == targets) | ~scored
    mean = (token * scored).sum(-1) / scored.sum(-1)
    return mean, hit.all(-1)


# ------------------------------------------------------------ running a checkpoint


def _generation_config(spec: EvalSet, eos_ids: list[int], pad_id: int):
    """The eval set's decoding, every field explicit: a checkpoint's generation_config.json (repetition_penalty,
    top_k, ...) would otherwise change the score."""
    from sdft_ds.models import explicit_generation_config

    return explicit_generation_config(
        sample=spec.sample, temperature=spec.temperature, top_p=spec.top_p, top_k=0 if spec.sample else None,
        max_new_tokens=spec.max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, cache_implementation=None,
        disable_compile=True)


def _batches(lengths: list[int], batch_size: int):
    """Row indices in batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_completions(model, prompt_ids: list[list[int]], spec: EvalSet, eos_ids: list[int], pad_id: int,
                         batch_size: int) -> list[list[int]]:
    """Completion tokens per prompt (EOS and what follows it included), left-padded batched `generate`."""
    config = _generation_config(spec, eos_ids, pad_id)
    if spec.sample:
        torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    completions: list[list[int]] = [[] for _ in prompt_ids]
    for batch in _batches([len(p) for p in prompt_ids], batch_size):
        ids, mask = left_pad([prompt_ids[i] for i in batch], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for i, row in zip(batch, out[:, ids.shape[1]:].tolist()):
            completions[i] = row
    return completions


def reference_logliks(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], eos_ids: list[int],
                      stop_id: int | None, pad_id: int, batch_size: int) -> tuple[list[float], list[bool]]:
    """Per row, the mean log-probability of answer (+ `stop_id`, scored as any EOS, unless None) after the prompt,
    and whether it is the greedy continuation."""
    device = next(model.parameters()).device
    references = [a + ([] if stop_id is None else [stop_id]) for a in answer_ids]
    means, greedy = [0.0] * len(references), [False] * len(references)
    for batch in _batches([len(p) + len(r) for p, r in zip(prompt_ids, references)], batch_size):
        ids, mask = left_pad([prompt_ids[i] + references[i] for i in batch], pad_id)  # (B, T), references flush right
        width = max(len(references[i]) for i in batch)  # M: the last M tokens hold every reference
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as in generate
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=width + 1).logits[:, :-1]  # (B, M, V): position t predicts t + 1
        lengths = torch.tensor([len(references[i]) for i in batch], device=device)
        column = torch.arange(width, device=device)
        scored = column[None, :] >= width - lengths[:, None]
        last = (column[None, :] == width - 1).expand_as(scored)  # every reference ends in the last column
        stop = last if stop_id is not None else torch.zeros_like(scored)
        mean, hit = reference_scores(logits, ids[:, -width:].to(device), scored, stop, eos_ids)
        for i, m, h in zip(batch, mean.tolist(), hit.tolist()):
            means[i], greedy[i] = m, h
    return means, greedy


def evaluate_set(model, tokenizer, spec: EvalSet, rows: Rows, batch_size: int) -> dict:
    """Score one eval set on a loaded model: {score, mean_loglik, n, unfinished}."""
    from sdft_ds.models import eos_ids as stop_ids

    eos_ids, pad_id = stop_ids(tokenizer, model), tokenizer.pad_token_id
    prompt_ids = [encode(tokenizer, p) for p in rows.prompts]
    if spec.metric == "loglik":
        answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in rows.answers]
        means, greedy = reference_logliks(model, prompt_ids, answer_ids, eos_ids,
                                          tokenizer.eos_token_id if spec.loglik_eos else None, pad_id, batch_size)
        return {"score": sum(greedy) / len(greedy), "mean_loglik": sum(means) / len(means), "n": len(means),
                "unfinished": 0}
    completions = generate_completions(model, prompt_ids, spec, eos_ids, pad_id, batch_size)
    hits, unfinished = [], 0
    for ids, answer in zip(completions, rows.answers):
        kept, ended = until_eos(ids, eos_ids)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        unfinished += not ended
        hits.append(exact_match(text, answer) if spec.metric == "exact_match" else regex_match(text, answer,
                                                                                               spec.pattern))
    return {"score": sum(hits) / len(hits), "mean_loglik": None, "n": len(hits), "unfinished": unfinished}


# ------------------------------------------------------------ lm-eval tasks (optional)


@functools.lru_cache(maxsize=None)
def _task_manager(include: str | None):
    """lm-eval's task index, one per include folder (built once: indexing lm-eval's own tasks takes ~15 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=include is None)


def lm_eval_key(spec: EvalSet) -> str:
    """The key of lm-eval's result that is the set's score ('acc,none': metric,filter), every name checked before
    any model loads. Builds the task once to read its metrics, which loads its dataset (a missing one fails here)."""
    where, name = f"eval set {spec.name!r}", spec.lm_eval_task
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"{where} names lm_eval_task {name!r}, and lm-eval is not installed: "
                         "pip install 'sdft_ds[lm-eval]'.")
    if spec.lm_eval_include is not None and not Path(spec.lm_eval_include).is_dir():
        raise ValueError(f"{where}: lm_eval_include {spec.lm_eval_include} is not a folder.")
    manager = _task_manager(spec.lm_eval_include)
    if name not in manager.all_subtasks:  # one result per set: a group or tag would give several
        looked = (f"the task YAMLs in {spec.lm_eval_include}" if spec.lm_eval_include else
                  "lm-eval's own tasks (lm_eval_include names a folder of local ones)")
        raise ValueError(f"{where}: lm_eval_task {name!r} is " + ("a group or tag, not one task (give one eval set "
                         "per task)," if name in manager.all_tasks else "no task") + f" among {looked}.")
    try:
        [task] = manager.load([name])["tasks"].values()
    except Exception as error:  # lm-eval and datasets raise many kinds (missing data file, bad YAML, no hub)
        raise ValueError(f"{where}: lm-eval could not build task {name!r}: {error}") from error
    filters = [f["name"] for f in task.config.filter_list or []] or ["none"]
    keys = [f"{metric},{kept}" for kept in filters for metric in task.aggregation()]
    wanted = spec.lm_eval_metric
    chosen = keys[:1] if wanted is None else [k for k in keys if wanted in (k, k.split(",")[0])]
    if len(chosen) != 1:
        raise ValueError(f"{where}: lm-eval task {name!r} " + (f"has no metric {wanted!r}" if not chosen else
                         f"has {wanted!r} under several filters") + f"; set lm_eval_metric to one of {keys}.")
    if not task.higher_is_better().get(chosen[0].split(",")[0], True):
        raise ValueError(f"{where}: lm-eval metric {chosen[0]} is lower-is-better; the table averages scores in "
                         "[0, 1] where higher is better. Choose another lm_eval_metric.")
    return chosen[0]


def lm_eval_metric(key: str) -> str:
    """The results' metric column for an lm-eval key: 'lm_eval:acc', or 'lm_eval:exact_match,strict-match'."""
    return "lm_eval:" + key.removesuffix(",none")


def evaluate_lm_eval(model, tokenizer, spec: EvalSet, key: str, batch_size: int) -> dict:
    """Score an lm-eval task on a loaded model: {score, mean_loglik: None, n, unfinished: None}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # The task is built afresh from the cached manager: lm-eval keeps per-run state (requests, few-shot) on it.
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=[spec.lm_eval_task],
        task_manager=_task_manager(spec.lm_eval_include), num_fewshot=spec.num_fewshot, limit=spec.limit,
        apply_chat_template=spec.lm_eval_chat, bootstrap_iters=0, log_samples=False)  # 0: no stderr, not tabled
    score = results["results"][spec.lm_eval_task][key]
    if not 0 <= score <= 1:
        raise ValueError(f"eval set {spec.name!r}: lm-eval metric {key} gave {score}, outside [0, 1] (the table "
                         "averages scores on one scale); choose another lm_eval_metric.")
    return {"score": float(score), "mean_loglik": None, "n": results["n-samples"][spec.lm_eval_task]["effective"],
            "unfinished": None}


def load_model(path: str, device: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    from sdft_ds.models import hub_errors

    with hub_errors(path, "checkpoint"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return model.to(device).eval()


def evaluate_checkpoint(path: str, stage: str, sets: list[tuple[EvalSet, Rows | str]], tokenizer, device: str,
                        batch_size: int = 16, dtype: str = "auto") -> list[dict]:
    """One result row per eval set for the checkpoint at `path`; each set comes with its Rows, or for an lm-eval
    set its result key (lm_eval_key)."""
    model = load_model(path, device, dtype)
    results = []
    with torch.no_grad():
        for spec, rows in sets:
            start = time.perf_counter()
            if spec.lm_eval_task:
                scores, metric = evaluate_lm_eval(model, tokenizer, spec, rows, batch_size), lm_eval_metric(rows)
            else:
                scores, metric = evaluate_set(model, tokenizer, spec, rows, batch_size), spec.metric
            results.append({"checkpoint": str(path), "stage": stage, "eval_set": spec.name, "role": spec.role,
                            "metric": metric, **scores, "seconds": round(time.perf_counter() - start, 3)})
    return results


# ------------------------------------------------------------ results file and table


def read_results(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_results(rows: list[dict], path) -> None:
    """Append rows to the JSONL file and rewrite its CSV twin (same name, .csv) from every row so far."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with path.with_suffix(".csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(read_results(path))


def format_table(rows: list[dict]) -> str:
    """A Markdown table: one line per stage (first-seen order), a column per new skill, then per prior skill, then
    the mean of the stage's prior-skill scores. Scores in %; loglik cells add the mean log-likelihood. A later row
    for the same (stage, eval set) replaces an earlier one. A set whose role changes between stages (sequential
    training: stage 2's prior is stage 1's new skill) is headed by its name alone, its new-role cells starred."""
    latest = {(r["stage"], r["eval_set"]): r for r in rows}
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    roles: dict[str, set] = {}
    for r in rows:
        roles.setdefault(r["eval_set"], set()).add(r["role"])
    first_role = {}
    for r in rows:
        first_role.setdefault(r["eval_set"], r["role"])
    sets = sorted(roles, key=lambda s: first_role[s] != "new")  # stable: first-seen order within each role
    header = ["stage", *(f"{next(iter(roles[s]))}: {s}" if len(roles[s]) == 1 else s for s in sets), "prior avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for stage in stages:
        cells, prior = [stage], []
        for s in sets:
            r = latest.get((stage, s))
            if r is None:
                cells.append("—")
                continue
            cell = f"{100 * r['score']:.1f}"
            if r.get("mean_loglik") is not None:
                cell += f" ({r['mean_loglik']:.3f})"
            if len(roles[s]) > 1 and r["role"] == "new":
                cell += "*"
            cells.append(cell)
            if r["role"] == "prior":
                prior.append(r["score"])
        cells.append(f"{100 * sum(prior) / len(prior):.1f}" if prior else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdft_ds.evaluate",
        description="Score Hugging Face checkpoints on eval sets; append one row per (checkpoint, eval set) to a "
                    "results file and print the new-skill / prior-skill table of every stage in it.")
    parser.add_argument("--model", action="append", required=True,
                        help="Checkpoint folder or hub name; repeat to score several, in order.")
    parser.add_argument("--eval-sets", required=True, help="YAML or JSON spec: a list of eval sets (name, path, "
                        "metric, role, ...; see sdft_ds.evaluate.EvalSet).")
    parser.add_argument("--results", required=True, help="Results .jsonl, appended to; a .csv twin is written "
                        "beside it.")
    parser.add_argument("--stage", action="append",
                        help="Table row label, once per --model (default: the checkpoint's folder name).")
    parser.add_argument("--tokenizer", help="Tokenizer folder or hub name (default: each checkpoint's own).")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per generate/forward call.")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="Weights' dtype (default: the checkpoint's own).")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = args.stage or [Path(m.rstrip("/")).name for m in args.model]
    try:  # every input is checked before the first model loads
        if len(stages) != len(args.model):
            raise ValueError(f"--stage was given {len(stages)} time(s) for {len(args.model)} --model(s); give one "
                             "per model, in the same order, or none.")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be at least 1.")
        if Path(args.results).suffix != ".jsonl":
            raise ValueError(f"--results {args.results} must end in .jsonl (its .csv twin is written beside it).")
        from sdft_ds.models import pretrained_source

        sets = [(spec, lm_eval_key(spec) if spec.lm_eval_task else load_rows(spec))
                for spec in read_eval_sets(args.eval_sets)]
        models = [pretrained_source(m, "--model") for m in args.model]
        tokenizers = [load_tokenizer(args.tokenizer or m, role="--tokenizer" if args.tokenizer else "--model")
                      for m in models]
        chat = any(spec.lm_eval_chat or isinstance(rows, Rows) and any(isinstance(p, list) for p in rows.prompts)
                   for spec, rows in sets)
        bare = [t.name_or_path for t in tokenizers if chat and t.chat_template is None]
        if bare:
            raise ValueError(f"An eval set has chat prompts (or lm_eval_chat), and the tokenizer of {bare[0]} has no "
                             "chat template. Pass --tokenizer with one, or give plain-string prompts.")
    except (ValueError, OSError) as error:  # FileNotFoundError, NotADirectoryError too
        parser.error(str(error))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for model, stage, tokenizer in zip(models, stages, tokenizers):
        rows = evaluate_checkpoint(model, stage, sets, tokenizer, device, args.batch_size, args.dtype)
        append_results(rows, args.results)
        for r in rows:
            loglik = "" if r["mean_loglik"] is None else f", mean loglik {r['mean_loglik']:.4f}"
            print(f"{stage} / {r['eval_set']}: {r['metric']} {r['score']:.4f}{loglik} (n={r['n']}, "
                  f"{r['seconds']:.1f}s)", file=sys.stderr)
    print(format_table(read_results(args.results)))


if __name__ == "__main__":
    main()
