"""One step on 2 ranks after a rollout (chunked divergence fused into the output layer) equals one plain-PyTorch
step of the naive dense loss on the same global batch — tied and untied output embeddings, ZeRO-3 and ZeRO-2
with CPU-Adam offload, ZeRO-1 and ZeRO-0 (the teacher then unpartitioned by default)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import launch
from sdft_ds.assets import model_dir

pytestmark = pytest.mark.multirank


def naive_divergence(student_logits, teacher_logits, alpha):
    """SPEC §2 written out, in float64."""
    log_s, log_t = student_logits.double().log_softmax(-1), teacher_logits.double().log_softmax(-1)
    s, t = log_s.exp(), log_t.exp()
    if alpha == 0:
        return (t * (log_t - log_s)).sum(-1)
    if alpha == 1:
        return (s * (log_s - log_t)).sum(-1)
    log_m = ((1 - alpha) * s + alpha * t).log()
    return alpha * (t * (log_t - log_m)).sum(-1) + (1 - alpha) * (s * (log_s - log_m)).sum(-1)


def completion_logits(model, ids, mask, start, length):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, start - 1:start - 1 + length]


@pytest.mark.parametrize("student, alpha, ds_config", [
    ("tiny-qwen2-student", 0.0, "zero3_offload.json"), ("tiny-llama", 0.5, "zero3_offload.json"),
    ("tiny-llama", 0.0, "zero2_offload.json"), ("tiny-qwen2-student", 0.0, "zero1.json"),
    ("tiny-qwen2-student", 0.5, "zero0.json")])
def test_step_matches_single_process_dense_reference(tmp_path, student, alpha, ds_config):
    launch(["tests/distributed/one_step.py", "--out", str(tmp_path), "--student", student, "--alpha", str(alpha),
            "--deepspeed", ds_config])
    saved = torch.load(tmp_path / "step.pt")
    model = AutoModelForCausalLM.from_pretrained(model_dir(student), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-teacher"), dtype=torch.float32)
    assert model.config.tie_word_embeddings == (student == "tiny-qwen2-student")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["before"][name].float(), value, msg=name)

    per_rank = []
    for b in saved["batches"]:
        length = b["completion_ids"].shape[1]
        with torch.no_grad():
            teacher_logits = completion_logits(teacher, b["teacher_input_ids"], b["teacher_attention_mask"],
                                               int(b["teacher_start"]), length)
        student_logits = completion_logits(model, b["input_ids"], b["attention_mask"], int(b["start"]), length)
        per_token = naive_divergence(student_logits, teacher_logits, alpha)
        mask = b["loss_mask"].double()
        per_rank.append(((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean())
    loss = torch.stack(per_rank).mean()  # data parallelism averages the ranks' gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, eps=1.0, weight_decay=0.0)
    loss.backward()
    optimizer.step()

    moved = 0.0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["after"][name].float(), value, rtol=0, atol=2e-6, msg=name)
        moved = max(moved, (value - saved["before"][name].float()).abs().max().item())
    assert moved > 1e-3  # the step really changed the weights
