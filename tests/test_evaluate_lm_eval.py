"""lm-eval tasks as eval sets: a local custom task (a YAML and a jsonl file, no hub) scored by lm-eval on a checkpoint
whose answers are known by construction, in the same results and table as file sets; and refusals raised before any
model loads. The tests that run lm-eval skip without it (pip install 'sdft_ds[lm-eval]'); the refusals run anyway."""

from __future__ import annotations

import importlib.util
import json

import pytest

import test_evaluate
from sdft_ds import evaluate
from sdft_ds.evaluate import EvalSet
from test_evaluate import cli_error, write_jsonl

# test_evaluate's module-scoped fixture, built once for this module too: the bigram checkpoint whose greedy answers
# are "Add 20 and 25." -> '45' and "Uppercase: 'salmon'" -> 'SALMON'
constructed = test_evaluate.constructed


def task_documents(add: str, upper: str) -> dict[str, list[dict]]:
    """Each task's documents, by data file; scores known from the checkpoint's greedy answers."""
    return {
        # generate_until: completions '45' and 'SALMON', so documents 0 and 1 are right and 2 and 3 wrong
        "generate": [{"prompt": add, "answer": "45"}, {"prompt": upper, "answer": "SALMON"},
                     {"prompt": add, "answer": "46"}, {"prompt": upper, "answer": "salmon"}],
        # multiple_choice: '45' is the argmax after `add`, so it has the highest log-likelihood of any choice
        "choice": [{"prompt": add, "choices": ["46", "45", "SALMON"], "label": 1},
                   {"prompt": add, "choices": ["45", "46"], "label": 1}],
        # two filters of one completion, 'SALMON': only the lowercased one matches
        "lower": [{"prompt": upper, "answer": "salmon"}],
    }


TASKS = """\
task: toy_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder}/generate.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 8}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
---
task: toy_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder}/choice.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
---
task: toy_filtered
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder}/lower.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\n"], do_sample: false, max_gen_toks: 8}}
filter_list:
  - {{name: as-is, filter: [{{function: take_first}}]}}
  - {{name: lower, filter: [{{function: lowercase}}, {{function: take_first}}]}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory, constructed):
    """The constructed checkpoint and a folder with the local lm-eval tasks and their data files."""
    pytest.importorskip("lm_eval")
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    documents = task_documents(constructed["add"], constructed["upper"])
    for name, data in documents.items():
        write_jsonl(folder / f"{name}.jsonl", data)
    for name, task in zip(("generate", "choice", "filtered"), TASKS.format(folder=folder).split("---\n")):
        (folder / f"{name}.yaml").write_text(task)
    return {"checkpoint": constructed["path"], "tasks": folder, **documents}


@pytest.fixture
def offline(monkeypatch):
    """No hub: every task reads a local file. datasets and huggingface_hub read the variables once, at import."""
    import datasets
    import huggingface_hub

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_local_lm_eval_tasks_score_as_constructed_beside_a_file_set(lm_eval_setup, offline, tmp_path, capsys):
    write_jsonl(tmp_path / "rows.jsonl", lm_eval_setup["generate"])
    spec = tmp_path / "sets.yaml"
    spec.write_text("eval_sets:\n"
                    "  - {name: add-file, path: rows.jsonl, role: new, max_new_tokens: 8}\n"
                    f"  - {{name: gen, lm_eval_task: toy_generate, lm_eval_include: {lm_eval_setup['tasks']}}}\n"
                    f"  - {{name: gen-2, lm_eval_task: toy_generate, lm_eval_include: {lm_eval_setup['tasks']}, "
                    "limit: 2}\n"
                    f"  - {{name: choice, lm_eval_task: toy_choice, lm_eval_include: {lm_eval_setup['tasks']}, "
                    "lm_eval_metric: acc}\n"
                    f"  - {{name: lower, lm_eval_task: toy_filtered, lm_eval_include: {lm_eval_setup['tasks']}, "
                    "lm_eval_metric: 'exact_match,lower'}\n")
    results = tmp_path / "results.jsonl"
    evaluate.main(["--model", lm_eval_setup["checkpoint"], "--eval-sets", str(spec), "--results", str(results),
                   "--stage", "s1", "--batch-size", "3"])
    rows = evaluate.read_results(results)
    assert [(r["eval_set"], r["metric"], r["score"], r["n"], r["mean_loglik"]) for r in rows] == [
        ("add-file", "exact_match", 0.5, 4, None),  # the same rows through the harness's own exact_match
        ("gen", "lm_eval:exact_match", 0.5, 4, None),
        ("gen-2", "lm_eval:exact_match", 1.0, 2, None),  # the first two documents, both right
        ("choice", "lm_eval:acc", 0.5, 2, None),
        ("lower", "lm_eval:exact_match,lower", 1.0, 1, None)]
    table = capsys.readouterr().out.strip().splitlines()[-3:]
    assert table[0] == ("| stage | new: add-file | prior: gen | prior: gen-2 | prior: choice | prior: lower | "
                        "prior avg |")
    assert table[2] == "| s1 | 50.0 | 50.0 | 100.0 | 50.0 | 100.0 | 75.0 |"


@pytest.mark.parametrize("entry, message", [
    ({"lm_eval_task": "no_such_task"}, "lm_eval_task 'no_such_task' is no task among the task YAMLs in {tasks}"),
    ({"lm_eval_task": "toy_choice", "lm_eval_metric": "f1"}, "has no metric 'f1'; set lm_eval_metric to one of "
                                                             "['acc,none']"),
    ({"lm_eval_task": "toy_filtered", "lm_eval_metric": "exact_match"}, "has 'exact_match' under several filters; "
     "set lm_eval_metric to one of ['exact_match,as-is', 'exact_match,lower']"),
])
def test_bad_lm_eval_sets_fail_before_any_model_loads(lm_eval_setup, offline, tmp_path, capsys, tokenizer, entry,
                                                      message):
    tokenizer.save_pretrained(tmp_path / "no-weights")  # a model folder that cannot load
    (tmp_path / "sets.json").write_text(json.dumps([{"name": "a", "lm_eval_include": str(lm_eval_setup["tasks"]),
                                                     **entry}]))
    error = cli_error(["--model", str(tmp_path / "no-weights"), "--eval-sets", str(tmp_path / "sets.json"),
                       "--results", str(tmp_path / "r.jsonl")], capsys)
    assert message.format(tasks=lm_eval_setup["tasks"]) in error


@pytest.mark.parametrize("fields, message", [
    ({"lm_eval_task": "t", "max_new_tokens": 8}, "max_new_tokens set with lm_eval_task"),
    ({"path": "d.jsonl", "limit": 5}, "limit set without lm_eval_task"),
    ({"path": "d.jsonl", "lm_eval_task": "t"}, "path and lm_eval_task are both set"),
    ({}, "give path (a file of rows) or lm_eval_task"),
    ({"lm_eval_task": "t", "num_fewshot": -1}, "num_fewshot=-1 must be at least 0"),
])
def test_lm_eval_fields_are_checked_without_lm_eval(fields, message):
    with pytest.raises(ValueError, match="^eval set 'a': ") as error:
        EvalSet("a", **fields)
    assert message in str(error.value)


def test_a_missing_lm_eval_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"lm-eval is not installed: pip install 'sdft_ds\[lm-eval\]'"):
        evaluate.lm_eval_key(EvalSet("a", lm_eval_task="arc_easy"))
