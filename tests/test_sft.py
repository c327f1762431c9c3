"""method='sft', the baseline: the same trainer, engines and batching, loss = token cross-entropy of the reference
`completion` after `prompt`. The loss equals a naive fp64 one, a few steps raise the completions' likelihood, no
teacher or rollout is built, and what SFT cannot train on is refused before any engine."""

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM

from conftest import launch
from helpers import max_difference
from sdft_ds import SDFTConfig, SDFTTrainer, engines
from sdft_ds.assets import DEMO_TRAIN, DEMO_TRAIN_CHAT, model_dir
from sdft_ds.cli import parse_args
from sdft_ds.data import tokenize_completions, with_completions
from sdft_ds.divergence import linear_cross_entropy
from test_zero3_step import completion_logits, global_loss


def demo_rows(path=DEMO_TRAIN_CHAT, rows: int = 16) -> Dataset:
    """The demo prompts with their `answer` as the reference completion."""
    data = load_dataset("json", data_files=str(path), split="train").select(range(rows))
    return data.select_columns(["prompt", "answer"]).rename_column("answer", "completion")


def naive_loss(model, batch, normalization: str) -> torch.Tensor:
    """SFT's loss spelled out in float64: log_softmax of the full logits at the completion positions, −log p of each
    reference token, masked mean per sequence then over sequences (or over all tokens)."""
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    length = batch.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    log_p = logits[:, batch.start - 1:batch.start - 1 + length].log_softmax(-1)
    nll = -log_p.gather(-1, batch.completion_ids.cpu()[..., None])[..., 0]
    loss_mask = batch.loss_mask.cpu().double()
    if normalization == "token":
        return (nll * loss_mask).sum() / loss_mask.sum()
    return ((nll * loss_mask).sum(-1) / loss_mask.sum(-1)).mean()


@pytest.mark.parametrize("ds_config, normalization", [("zero3_offload.json", "sequence"), ("zero0.json", "token")])
def test_sft_loss_is_the_naive_cross_entropy_and_steps_lower_it(tmp_path, in_process, tokenizer, ds_config,
                                                                normalization):
    # loaded before the trainer registers its ZeRO stage with transformers (which would then partition it)
    reference = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-student"), dtype=torch.float64)
    args = SDFTConfig(output_dir=str(tmp_path), method="sft", deepspeed=ds_config, max_steps=6,
                      per_device_train_batch_size=4, learning_rate=3e-3, max_completion_length=16, logging_steps=6,
                      loss_normalization=normalization, num_loss_tokens_to_skip=3)  # SDFT's setting: not SFT's
    trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                          train_dataset=demo_rows())
    assert trainer.teacher is None and trainer.rollout is None  # nothing but the student was built

    (batch,) = trainer.reference_round()
    trainer.sampler.rounds_done = 0  # train() starts from the same rows
    assert bool((batch.loss_mask == batch.completion_mask).all())  # every completion token, up to its end of turn
    end_of_turn = batch.completion_ids[torch.arange(4), batch.completion_mask.sum(-1) - 1]
    assert end_of_turn.tolist() == [tokenizer.convert_tokens_to_ids("<|im_end|>")] * 4

    def loss() -> float:
        weights = trainer._token_weights(batch, trainer._step_loss_tokens([batch]))
        with torch.no_grad():
            return float(trainer._cross_entropy(batch, weights).loss)

    before = loss()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(before, dtype=torch.float64),
                                   naive_loss(reference, batch, normalization), rtol=1e-5, atol=0)
    metrics = trainer.train()
    assert trainer.step == 6 and metrics["loss"] == metrics["loss"]
    assert loss() < 0.85 * before  # the reference completions became likelier (2.26 -> 1.80 measured)

    if ds_config == "zero0.json":  # the gradients too, where the engine holds them whole
        reference.load_state_dict({k: v.double() for k, v in engines.consolidated_state_dict(trainer.student).items()},
                                  strict=False)  # a tied head's weight is the embedding's
        naive_loss(reference, batch, normalization).backward()
        weights = trainer._token_weights(batch, trainer._step_loss_tokens([batch]))
        trainer.student.backward(trainer._cross_entropy(batch, weights).loss)
        lm = engines.language_model(trainer.student)
        for (name, param), expected in zip(lm.named_parameters(), reference.parameters()):
            torch.testing.assert_close(param.grad.double(), expected.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_chunked_cross_entropy_and_its_gradients_match_the_dense_reference():
    torch.manual_seed(0)
    hidden = torch.randn(47, 31, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(123, 31, dtype=torch.float64, requires_grad=True)
    target, token_weights = torch.randint(0, 123, (47,)), torch.rand(47, dtype=torch.float64)
    out = linear_cross_entropy(hidden, weight, target, token_weights, token_chunk=5, vocab_chunk=37)
    expected = (token_weights * torch.nn.functional.cross_entropy(hidden @ weight.T, target, reduction="none")).sum()
    torch.testing.assert_close(out.loss, expected)
    grads, expected_grads = (torch.autograd.grad(loss, (hidden, weight)) for loss in (out.loss, expected))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_text_completions_end_with_eos_and_long_ones_are_cut(tokenizer):
    rows = with_completions(Dataset.from_dict({"prompt": ["Add 2 and 3.", "Say a lot."],
                                               "completion": ["5", " ".join(["word"] * 40)]}))
    short, long = tokenize_completions(rows, tokenizer, max_completion_length=8)
    assert short == tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(long) == 8 and tokenizer.eos_token_id not in long  # counted as truncated, not taught to stop


@pytest.fixture
def no_engines(monkeypatch):
    def too_late():
        raise AssertionError("the trainer reached init_distributed before refusing")
    monkeypatch.setattr("sdft_ds.engines.init_distributed", too_late)


def make(tokenizer, dataset, ref_model=None):
    return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), ref_model=ref_model,
                       args=SDFTConfig(output_dir="unused", method="sft"), processing_class=tokenizer,
                       train_dataset=dataset)


def test_what_sft_cannot_train_on_is_refused_before_any_engine(tokenizer, no_engines):
    with pytest.raises(ValueError, match=r"method='sft'.*no 'completion' column.*rename_column\('answer', "
                                         r"'completion'\)"):
        make(tokenizer, str(DEMO_TRAIN))
    with pytest.raises(ValueError, match=r"Row 1: column 'completion' is empty"):
        make(tokenizer, Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", " "]}))
    with pytest.raises(ValueError, match=r"Row 0: column 'completion' must be text"):
        make(tokenizer, Dataset.from_dict({"prompt": ["a"], "completion": [[{"role": "assistant", "content": "x"}]]}))
    with pytest.raises(ValueError, match=r"method='sft'.*builds no teacher; drop ref_model"):
        make(tokenizer, demo_rows(), ref_model=str(model_dir("tiny-qwen2-teacher")))
    with pytest.raises(ValueError, match=r"method='ppo' is not valid; choose one of sdft, sft"):
        SDFTConfig(method="ppo")


def test_the_launcher_switches_with_one_line_and_refuses_a_teacher_for_sft(capsys):
    base = ["--model_name_or_path", "sdft_ds/assets/models/tiny-qwen2-student", "--dataset_name", "rows.jsonl"]
    assert parse_args([*base, "--method", "sft"])[1].method == "sft"
    with pytest.raises(SystemExit):
        parse_args([*base, "--method", "sft", "--eval_dataset_name", "heldout.jsonl"])
    assert "method=sft builds no teacher, so eval_dataset_name" in capsys.readouterr().err


def test_an_sft_run_resumes_exactly_and_only_as_sft(tmp_path, in_process, tokenizer):
    from sdft_ds.checkpoint import CheckpointError

    def trainer(method="sft", **settings):
        args = SDFTConfig(output_dir=str(tmp_path), method=method, deepspeed="zero0.json", max_steps=3,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                          max_completion_length=16, **settings)
        rows = demo_rows().add_column("privileged_context", ["x"] * 16)  # so that SDFT could read the rows too
        return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args, processing_class=tokenizer,
                           train_dataset=rows)

    first = trainer()
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    first.train_step()
    expected = engines.consolidated_state_dict(first.student)
    with pytest.raises(CheckpointError, match=r"method: 'sft' -> 'sdft'"):
        trainer("sdft", resume_from_checkpoint="latest")
    resumed = trainer(resume_from_checkpoint="latest")
    resumed.train()
    assert resumed.step == 3
    for name, value in engines.consolidated_state_dict(resumed.student).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.multirank
def test_a_two_rank_zero3_sft_step_equals_a_plain_pytorch_step(tmp_path, normalization="token"):
    """Each rank's rows, two micro-batches each: the step equals plain AdamW on SPEC §2's global reduction of the
    naive cross-entropy (the same reduction as SDFT's: tests/test_zero3_step.py; token normalisation, the one that
    counts tokens over ranks; sequence normalisation is checked in-process above)."""
    launch(["tests/distributed/sft_step.py", "--out", str(tmp_path), "--normalization", normalization])
    saved = torch.load(tmp_path / "step.pt")
    model = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-student"), dtype=torch.float32)
    per_token = [[-completion_logits(model, b["input_ids"], b["attention_mask"], int(b["start"]),
                                     b["completion_ids"].shape[1]).double().log_softmax(-1)
                  .gather(-1, b["completion_ids"][..., None])[..., 0] for b in rank] for rank in saved["batches"]]
    masks = [[b["loss_mask"].double() for b in rank] for rank in saved["batches"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, eps=1.0, weight_decay=0.0)
    global_loss(per_token, masks, normalization).backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["after"][name].float(), value, rtol=0, atol=2e-6, msg=name)
    assert max_difference(model.state_dict(), saved["before"]) > 1e-3  # the step really changed the weights
