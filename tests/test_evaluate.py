"""The forgetting harness on checkpoints whose scores are known by construction, the table's shape across stages,
batch invariance on a trained tiny model, and input errors raised before any model loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdft_ds import evaluate
from sdft_ds.assets import DEMO_HELDOUT_CHAT, model_dir
from sdft_ds.data import encode
from sdft_ds.evaluate import EvalSet, Rows

EOS, END_OF_TEXT = 2, 0  # <|im_end|> (the tokenizer's eos) and <|endoftext|>: both stop the constructed model
SCALE = 1000.0  # embedding size of a context token: RMSNorm then maps it to sqrt(hidden) · one-hot, eps negligible
MARGIN = 6.0  # the chosen successor's logit lead over seeded N(0, 1) noise: it is the argmax


def bigram_checkpoint(directory, tokenizer, successor: dict[int, int], seed: int = 0):
    """A Llama whose next-token logits depend on the current token only. Attention and MLP outputs are zeroed, so
    the last hidden state is RMSNorm(embedding). Context token k of `successor` embeds as SCALE · e_k and gets
    logits noise + MARGIN · one-hot(successor); every other token embeds as 0, so its logits are all 0 and greedy
    decoding picks id 0, an EOS. Returns the logits table {context: (V,) fp64} for the hand-computed reference."""
    hidden = 64
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=[EOS, END_OF_TEXT], pad_token_id=END_OF_TEXT)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randn(hidden, len(tokenizer), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        for k, (context, following) in enumerate(successor.items()):
            model.model.embed_tokens.weight[context, k] = SCALE
            columns[k, following] += MARGIN
        model.lm_head.weight.copy_(columns.T / hidden ** 0.5)
    model.generation_config.eos_token_id = [EOS, END_OF_TEXT]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # fp64 reference from the stored fp32 weights: logits = W · RMSNorm(x), RMSNorm(x) = x / sqrt(mean(x²) + eps)
    weight = model.lm_head.weight.detach().double()
    table = {}
    for k, context in enumerate(successor):
        x = torch.zeros(hidden, dtype=torch.float64)
        x[k] = SCALE
        table[context] = weight @ (x / torch.sqrt((x ** 2).mean() + config.rms_norm_eps))
    return table


@pytest.fixture(scope="module")
def constructed(tmp_path_factory, tokenizer):
    """The bigram checkpoint with two greedy chains: "Add 20 and 25." -> '45', "Uppercase: 'salmon'" -> 'SALMON'."""
    add, upper = "Add 20 and 25.", "Uppercase: 'salmon'"
    last = {p: tokenizer(p)["input_ids"][-1] for p in (add, upper)}
    forty_five = tokenizer("45", add_special_tokens=False)["input_ids"]
    sal, mon = tokenizer("SALMON", add_special_tokens=False)["input_ids"]
    assert len(forty_five) == 1 and len({last[add], last[upper], forty_five[0], sal, mon}) == 5
    successor = {last[add]: forty_five[0], forty_five[0]: EOS, last[upper]: sal, sal: mon, mon: EOS}
    directory = tmp_path_factory.mktemp("bigram")
    table = bigram_checkpoint(directory, tokenizer, successor)
    return {"path": str(directory), "table": table, "add": add, "upper": upper}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def score(path, spec: EvalSet, tokenizer, batch_size: int = 3) -> dict:
    [row] = evaluate.evaluate_checkpoint(path, "s", [(spec, evaluate.load_rows(spec))], tokenizer, "cpu", batch_size)
    return row


def test_exact_match_scores_known_by_construction(constructed, tokenizer, tmp_path):
    add, upper = constructed["add"], constructed["upper"]
    right = [{"prompt": add, "answer": "45"}, {"prompt": upper, "answer": " SALMON\n"}]  # compared stripped
    wrong = [{"prompt": add, "answer": "46"}, {"prompt": upper, "answer": "SAL"}]
    for rows, expected in ((right, 1.0), (wrong, 0.0), (right + wrong + right[:1] + wrong[:1], 0.5)):
        spec = EvalSet("sets", write_jsonl(tmp_path / "rows.jsonl", rows), max_new_tokens=8)
        result = score(constructed["path"], spec, tokenizer)
        assert (result["score"], result["n"], result["unfinished"]) == (expected, len(rows), 0)


def test_a_completion_cut_by_the_token_limit_is_scored_as_it_stands(constructed, tokenizer, tmp_path):
    rows = [{"prompt": constructed["upper"], "answer": "SAL"}]
    spec = EvalSet("cut", write_jsonl(tmp_path / "rows.jsonl", rows), max_new_tokens=1)
    result = score(constructed["path"], spec, tokenizer)
    assert (result["score"], result["unfinished"]) == (1.0, 1)


def test_regex_searches_the_completion_with_the_answer_or_a_pattern(constructed, tokenizer, tmp_path):
    add, upper = constructed["add"], constructed["upper"]
    rows = [{"prompt": add, "answer": "^4[0-9]$"}, {"prompt": upper, "answer": "MON$"},
            {"prompt": add, "answer": "^5"}, {"prompt": upper, "answer": "salmon"}]
    spec = EvalSet("regex", write_jsonl(tmp_path / "rows.jsonl", rows), metric="regex", max_new_tokens=8)
    assert score(constructed["path"], spec, tokenizer)["score"] == 0.5
    rows = [{"prompt": add, "answer": "4"}, {"prompt": upper, "answer": "SAL"}, {"prompt": add, "answer": "5"}]
    spec = EvalSet("pattern", write_jsonl(tmp_path / "rows.jsonl", rows), metric="regex", max_new_tokens=8,
                   pattern="^{answer}")
    assert score(constructed["path"], spec, tokenizer)["score"] == pytest.approx(2 / 3)
    assert evaluate.regex_match("a+b=3", "a+b", "^{answer}=")  # the answer is escaped, not a pattern


@pytest.mark.parametrize("with_eos", [True, False])
def test_loglik_matches_an_fp64_reference(constructed, tokenizer, tmp_path, with_eos):
    add, upper, table = constructed["add"], constructed["upper"], constructed["table"]
    rows = [{"prompt": add, "answer": "45"}, {"prompt": upper, "answer": "SALMON"},
            {"prompt": upper, "answer": "SAL"}, {"prompt": add, "answer": "45 SALMON"}]

    def reference(prompt: str, answer: str) -> tuple[float, bool]:
        ids = tokenizer(prompt)["input_ids"][-1:] + tokenizer(answer, add_special_tokens=False)["input_ids"]
        uniform = torch.zeros(len(tokenizer), dtype=torch.float64)  # a token outside the table: logits all 0
        steps = [torch.log_softmax(table.get(context, uniform), -1) for context in ids]
        values = [lp[target] for lp, target in zip(steps, ids[1:])]
        hits = [int(lp.argmax()) == target for lp, target in zip(steps, ids[1:])]
        if with_eos:
            values.append(torch.logsumexp(steps[-1][[EOS, END_OF_TEXT]], 0))
            hits.append(int(steps[-1].argmax()) in (EOS, END_OF_TEXT))
        return float(sum(values) / len(values)), all(hits)

    expected = [reference(r["prompt"], r["answer"]) for r in rows]
    assert [hit for _, hit in expected] == ([True, True, False, False] if with_eos else [True, True, True, False])
    spec = EvalSet("ll", write_jsonl(tmp_path / "rows.jsonl", rows), metric="loglik", loglik_eos=with_eos)
    for batch_size in (1, 3):
        result = score(constructed["path"], spec, tokenizer, batch_size)
        assert result["mean_loglik"] == pytest.approx(sum(m for m, _ in expected) / len(rows), abs=1e-5)
        assert result["score"] == sum(hit for _, hit in expected) / len(rows)


def test_batching_changes_no_completion_or_loglik_on_a_trained_model(tokenizer):
    """Left padding and length-sorted batches: a trained model (real attention) gives what it gives one by one."""
    model = evaluate.load_model(str(model_dir("tiny-qwen2-student")), "cpu")
    rows = evaluate.load_rows(EvalSet("demo", str(DEMO_HELDOUT_CHAT)))
    prompts = [encode(tokenizer, p) for p in rows.prompts[:10]]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in rows.answers[:10]]
    assert len({len(p) for p in prompts}) > 3  # the batches are padded
    spec, eos_ids = EvalSet("demo", str(DEMO_HELDOUT_CHAT), max_new_tokens=8), [EOS, END_OF_TEXT]
    with torch.no_grad():
        alone, together = (evaluate.generate_completions(model, prompts, spec, eos_ids, END_OF_TEXT, b) for b in (1, 4))
        (ll_alone, hit_alone), (ll_together, hit_together) = (
            evaluate.reference_logliks(model, prompts, answers, eos_ids, EOS, END_OF_TEXT, b) for b in (1, 4))
    assert [evaluate.until_eos(c, eos_ids) for c in alone] == [evaluate.until_eos(c, eos_ids) for c in together]
    assert sum(len(evaluate.until_eos(c, eos_ids)[0]) for c in alone) > 10  # it answers, not just stops
    assert ll_alone == pytest.approx(ll_together, abs=1e-5) and hit_alone == hit_together
    assert all(-20 < ll < 0 for ll in ll_alone)


def test_sampling_is_reproducible_from_its_seed(tokenizer):
    model = evaluate.load_model(str(model_dir("tiny-qwen2-student")), "cpu")
    prompts = [encode(tokenizer, p) for p in evaluate.load_rows(EvalSet("d", str(DEMO_HELDOUT_CHAT))).prompts[:8]]

    def sampled(seed: int) -> list[list[int]]:
        spec = EvalSet("d", str(DEMO_HELDOUT_CHAT), max_new_tokens=8, sample=True, seed=seed)
        with torch.no_grad():
            return evaluate.generate_completions(model, prompts, spec, [EOS, END_OF_TEXT], END_OF_TEXT, 4)

    assert sampled(3) == sampled(3) != sampled(4)


def test_chat_prompts_are_rendered_with_the_chat_template(tokenizer, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Add 20 and 25."}], "answer": "45"}]
    spec = EvalSet("chat", write_jsonl(tmp_path / "chat.jsonl", rows), metric="loglik")
    plain = EvalSet("plain", write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Add 20 and 25.", "answer": "45"}]),
                    metric="loglik")
    path = str(model_dir("tiny-qwen2-student"))
    chat, text = evaluate.evaluate_checkpoint(path, "s", [(s, evaluate.load_rows(s)) for s in (spec, plain)],
                                              tokenizer, "cpu")
    assert chat["mean_loglik"] != pytest.approx(text["mean_loglik"])  # the template's tokens reached the model


def test_table_has_the_papers_shape_and_averages_prior_skills():
    rows = [
        {"stage": "base", "eval_set": "cipher", "role": "new", "score": 0.1, "mean_loglik": None},
        {"stage": "base", "eval_set": "reversal", "role": "prior", "score": 0.5, "mean_loglik": None},
        {"stage": "base", "eval_set": "counting", "role": "prior", "score": 0.7, "mean_loglik": -1.25},
        {"stage": "sft", "eval_set": "cipher", "role": "new", "score": 0.9, "mean_loglik": None},
        {"stage": "sft", "eval_set": "reversal", "role": "prior", "score": 0.2, "mean_loglik": None},
        {"stage": "base", "eval_set": "cipher", "role": "new", "score": 0.2, "mean_loglik": None},  # a re-run wins
    ]
    assert evaluate.format_table(rows).splitlines() == [
        "| stage | new: cipher | prior: reversal | prior: counting | prior avg |",
        "|---|---|---|---|---|",
        "| base | 20.0 | 50.0 | 70.0 (-1.250) | 60.0 |",
        "| sft | 90.0 | 20.0 | — | 20.0 |",
    ]


def test_a_skill_new_in_one_stage_and_prior_in_the_next_is_starred_where_new():
    rows = [{"stage": "stage 1", "eval_set": "tools", "role": "new", "score": 0.5, "mean_loglik": None},
            {"stage": "stage 2", "eval_set": "science", "role": "new", "score": 0.25, "mean_loglik": None},
            {"stage": "stage 2", "eval_set": "tools", "role": "prior", "score": 0.75, "mean_loglik": None}]
    assert evaluate.format_table(rows).splitlines()[::2] == [
        "| stage | tools | new: science | prior avg |",
        "| stage 1 | 50.0* | — | — |",
    ]
    assert evaluate.format_table(rows).splitlines()[3] == "| stage 2 | 75.0 | 25.0 | 75.0 |"


def test_cli_accumulates_two_stages_into_one_table(constructed, tmp_path, capsys):
    add, upper = constructed["add"], constructed["upper"]
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": add, "answer": "45", "skill": "add"},
                                          {"prompt": upper, "answer": "SALMON", "skill": "upper"},
                                          {"prompt": upper, "answer": "salmon", "skill": "upper"}])
    spec = tmp_path / "sets.yaml"
    spec.write_text("eval_sets:\n"
                    "  - {name: add, path: data.jsonl, role: new, select: {skill: add}, max_new_tokens: 4}\n"
                    "  - {name: upper, path: data.jsonl, select: {skill: upper}, max_new_tokens: 4}\n"
                    "  - {name: upper-ll, path: data.jsonl, metric: loglik, select: {skill: upper}}\n")
    results = tmp_path / "out" / "results.jsonl"
    for stage in ("stage 1", "stage 2"):
        evaluate.main(["--model", constructed["path"], "--eval-sets", str(spec), "--results", str(results),
                       "--stage", stage, "--batch-size", "2"])
    table = capsys.readouterr().out.strip().splitlines()[-4:]
    assert table[0] == "| stage | new: add | prior: upper | prior: upper-ll | prior avg |"
    assert table[2].startswith("| stage 1 | 100.0 | 50.0 | 50.0 (") and table[2].endswith(" | 50.0 |")
    assert table[3].startswith("| stage 2 | 100.0 | 50.0 |")
    rows = evaluate.read_results(results)
    assert [(r["stage"], r["eval_set"], r["n"]) for r in rows] == [
        (s, name, n) for s in ("stage 1", "stage 2") for name, n in (("add", 1), ("upper", 2), ("upper-ll", 2))]
    assert rows[0]["checkpoint"] == constructed["path"] and rows[0]["seconds"] >= 0
    csv_lines = results.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(evaluate.RESULT_FIELDS) and len(csv_lines) == 7


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def unloadable_model(tmp_path, tokenizer):
    """A model folder with a tokenizer and no weights: an error that is not about loading it was raised first."""
    directory = tmp_path / "no-weights"
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("spec, data, message", [
    ({"name": "a", "path": "missing.jsonl"}, None, "no such file"),
    ({"name": "a", "path": "d.jsonl"}, [{"prompt": "p", "reply": "x"}], "needs a 'answer' column"),
    ({"name": "a", "path": "d.jsonl"}, [{"question": "p", "answer": "x"}], "needs a 'prompt' column"),
    ({"name": "a", "path": "d.jsonl", "metric": "bleu"}, [{"prompt": "p", "answer": "x"}], "unknown metric 'bleu'"),
    ({"name": "a", "path": "d.jsonl", "role": "old"}, [{"prompt": "p", "answer": "x"}], "unknown role 'old'"),
    ({"name": "a", "path": "d.jsonl", "metrc": "regex"}, [{"prompt": "p", "answer": "x"}], "unknown field(s)"),
    ({"name": "a", "path": "d.jsonl", "metric": "regex"}, [{"prompt": "p", "answer": "(x"}], "row 0: answer"),
    ({"name": "a", "path": "d.jsonl"}, [{"prompt": "p", "answer": ""}], "row 0: 'answer' must be"),
    ({"name": "a", "path": "d.jsonl"}, [{"prompt": "", "answer": "x"}], "column 'prompt' is empty"),
    ({"name": "a", "path": "d.jsonl", "metric": "loglik", "sample": True}, [{"prompt": "p", "answer": "x"}],
     "samples nothing"),
    ({"name": "a", "path": "d.jsonl", "select": {"skill": "add"}}, [{"prompt": "p", "answer": "x"}],
     "select names column 'skill'"),
])
def test_bad_inputs_fail_before_any_model_loads(tmp_path, capsys, unloadable_model, spec, data, message):
    if data is not None:
        write_jsonl(tmp_path / "d.jsonl", data)
    (tmp_path / "sets.json").write_text(json.dumps([spec]))
    error = cli_error(["--model", unloadable_model, "--eval-sets", str(tmp_path / "sets.json"),
                       "--results", str(tmp_path / "r.jsonl")], capsys)
    assert message in error


def test_bad_command_lines_fail_with_a_message(tmp_path, capsys, unloadable_model, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "x"}])
    (tmp_path / "sets.yaml").write_text("- {name: a, path: d.jsonl}\n")
    base = ["--eval-sets", str(tmp_path / "sets.yaml"), "--results", str(tmp_path / "r.jsonl")]
    assert "no such folder" in cli_error(["--model", str(tmp_path / "nowhere"), *base], capsys)
    assert "--stage was given 2" in cli_error(["--model", unloadable_model, "--stage", "a", "--stage", "b", *base],
                                              capsys)
    assert "must end in .jsonl" in cli_error(["--model", unloadable_model, *base[:2], "--results", "r.csv"], capsys)
    assert "no such eval-set spec" in cli_error(["--model", unloadable_model, "--eval-sets", "nope.yaml",
                                                 *base[2:]], capsys)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "p"}], "answer": "x"}])
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "no-template")
    assert "has no chat template" in cli_error(["--model", unloadable_model, "--tokenizer",
                                                str(tmp_path / "no-template"), *base], capsys)
    assert not (tmp_path / "r.jsonl").exists()


def test_csv_answers_stay_strings(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,answer\nPad 7 to three digits.,007\n")
    assert evaluate.load_rows(EvalSet("csv", str(tmp_path / "d.csv"))) == Rows(["Pad 7 to three digits."], ["007"])
