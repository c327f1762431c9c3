"""One step on 2 ranks after a rollout (chunked divergence fused into the output layer) equals one plain-PyTorch
step of the naive dense loss on the same global batch — tied and untied output embeddings, ZeRO-3 and ZeRO-2
with CPU-Adam offload, ZeRO-1 and ZeRO-0 (the teacher then unpartitioned by default), one or two micro-batches
per rank, per-sequence and global per-token normalisation; and once with divergence_impl="dense", the full-logits
reference path that users may run to check the chunked one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import launch
from helpers import max_difference, naive_divergence
from sdft_ds.assets import model_dir

pytestmark = pytest.mark.multirank


def completion_logits(model, ids, mask, start, length):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, start - 1:start - 1 + length]


def global_loss(per_token, masks, normalization):
    """SPEC §2 over the step's global batch: `per_token[r][a]` and `masks[r][a]` of rank r's micro-batch a."""
    if normalization == "token":  # every unmasked token of every rank and micro-batch counts once
        total = sum((d * m).sum() for rank, rank_masks in zip(per_token, masks) for d, m in zip(rank, rank_masks))
        return total / sum(m.sum() for rank_masks in masks for m in rank_masks)
    per_rank = [sum(((d * m).sum(-1) / m.sum(-1).clamp(min=1)).mean() for d, m in zip(rank, rank_masks)) / len(rank)
                for rank, rank_masks in zip(per_token, masks)]  # divided by accumulation steps
    return torch.stack(per_rank).mean()  # data parallelism averages the ranks' gradients


def reference_step(student, teacher, batches, alpha, normalization, scale=1.0):
    """The student's weights after one plain-PyTorch AdamW step (lr = 1, eps = 1) on `scale` × the global loss."""
    model = AutoModelForCausalLM.from_pretrained(model_dir(student), dtype=torch.float32)
    per_token = [[] for _ in batches]
    masks = [[b["loss_mask"].double() for b in rank] for rank in batches]
    for rank, out in zip(batches, per_token):
        for b in rank:
            length = b["completion_ids"].shape[1]
            with torch.no_grad():
                teacher_logits = completion_logits(teacher, b["teacher_input_ids"], b["teacher_attention_mask"],
                                                   int(b["teacher_start"]), length)
            student_logits = completion_logits(model, b["input_ids"], b["attention_mask"], int(b["start"]), length)
            out.append(naive_divergence(student_logits, teacher_logits, alpha=alpha))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, eps=1.0, weight_decay=0.0)
    (scale * global_loss(per_token, masks, normalization)).backward()
    optimizer.step()
    return model.state_dict()


CHUNKED = [  # student, alpha, ds_config, accumulation, normalization
    ("tiny-qwen2-student", 0.0, "zero3_offload.json", 1, "sequence"),
    ("tiny-llama", 0.5, "zero3_offload.json", 1, "sequence"),
    ("tiny-llama", 0.0, "zero2_offload.json", 1, "sequence"), ("tiny-qwen2-student", 0.0, "zero1.json", 1, "sequence"),
    ("tiny-qwen2-student", 0.5, "zero0.json", 1, "sequence"),
    ("tiny-qwen2-student", 0.0, "zero3_offload.json", 2, "token"),
    ("tiny-llama", 0.0, "zero3_offload.json", 2, "sequence")]
DENSE = [("tiny-llama", 0.5, "zero3_offload.json", 1, "sequence")]  # untied head, JSD, partitioned weight


@pytest.mark.parametrize("student, alpha, ds_config, accumulation, normalization, impl",
                         [(*case, "chunked") for case in CHUNKED] + [(*case, "dense") for case in DENSE])
def test_step_matches_single_process_dense_reference(tmp_path, student, alpha, ds_config, accumulation,
                                                     normalization, impl):
    launch(["tests/distributed/one_step.py", "--out", str(tmp_path), "--student", student, "--alpha", str(alpha),
            "--deepspeed", ds_config, "--accumulation", str(accumulation), "--normalization", normalization,
            "--impl", impl])
    saved = torch.load(tmp_path / "step.pt")
    model = AutoModelForCausalLM.from_pretrained(model_dir(student), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-teacher"), dtype=torch.float32)
    assert model.config.tie_word_embeddings == (student == "tiny-qwen2-student")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["before"][name].float(), value, msg=name)
    assert [len(rank) for rank in saved["batches"]] == [accumulation] * 2

    expected = reference_step(student, teacher, saved["batches"], alpha, normalization)
    for name, value in expected.items():
        torch.testing.assert_close(saved["after"][name].float(), value, rtol=0, atol=2e-6, msg=name)
    assert max_difference(expected, saved["before"]) > 1e-3  # the step really changed the weights
    if accumulation > 1:  # the comparison can tell the other normalisation and a gradient off by the accumulation
        other = "sequence" if normalization == "token" else "token"
        for wrong in (reference_step(student, teacher, saved["batches"], alpha, other),
                      reference_step(student, teacher, saved["batches"], alpha, normalization, scale=accumulation)):
            assert max_difference(wrong, saved["after"]) > 1e-4
