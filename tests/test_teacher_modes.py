"""Teacher modes, generation from the teacher, several generations per prompt, sparse EMA syncs and rollout reuse
(its importance ratio against a float64 reference), on 2 ranks under ZeRO-3."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import launch, read_reports
from sdft_ds.assets import model_dir

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes")
    launch(["tests/distributed/teacher_modes.py", "--out", str(out)])
    return read_reports(out)


@pytest.mark.parametrize("rate", [0.01, 1.0])
def test_ema_teacher_is_the_weighted_average_after_a_step(reports, rate):
    rank0 = reports[0]
    assert rank0[f"ema_{rate}_teacher_moved"] > 1e-4
    assert rank0[f"ema_{rate}_max_error"] < 1e-6
    assert all(r[f"ema_{rate}_syncs"] == 1 for r in reports)


def test_ema_of_a_bf16_teacher_keeps_its_average_in_fp32(reports):
    rank0 = reports[0]
    assert rank0["ema_bf16_dtype"] == "torch.bfloat16"
    assert rank0["ema_bf16_mismatches"] == 0
    assert rank0["ema_bf16_naive_differs"] > 0  # the check can tell the two apart


def test_live_teacher_tracks_the_student(reports):
    rank0 = reports[0]
    assert rank0["live_teacher_is_student"] and rank0["live_student_moved"] > 1e-3
    assert rank0["live_heldout_divergence"] == pytest.approx(0.0, abs=1e-7)


def test_generation_from_the_teacher_sees_teacher_prompts_only(reports):
    for report in reports:
        assert report["rollout_engine_is_teacher"]
        assert report["generation_saw_teacher_prompts"]
        assert report["student_batch_has_student_prompts"]
        assert report["teacher_batch_has_teacher_prompts"]


def test_reused_rollouts_get_the_clipped_ratio_and_fresh_ones_none(reports):
    for report in reports:
        assert not report["reuse_step1_has_ratio"]
        ratio = report["reuse_step2_ratio"]
        assert ratio["is_ratio_max"] <= 1.02 + 1e-6
        assert ratio["is_ratio_min"] > 0 and ratio["is_ratio_min"] != 1.0
        assert report["reuse_queue_consumed"]


def _real(ids, mask):
    return [t for t, m in zip(ids, mask) if m]


def test_several_generations_per_prompt_and_a_sparse_ema_sync(tmp_path):
    """num_generations = 2, EMA synced every 2 steps, 5 steps on 2 ranks (2 prompts × 2 completions a round)."""
    launch(["tests/distributed/generations_sync.py", "--out", str(tmp_path)])
    generations, sync_steps = 2, 2
    reports = read_reports(tmp_path)
    for report in reports:
        prompts, teacher_prompts = iter(report["prompt_ids"]), iter(report["teacher_prompt_ids"])
        assert len(report["rounds"]) == 3  # 4 completions a round, 2 per step: steps 1-2, 3-4, 5
        for round_ in report["rounds"]:
            assert len(round_["rows"]) == 2
            mine = [(next(prompts), next(teacher_prompts)) for _ in round_["rows"]]  # the rows sampled, in order
            assert mine[0][0] != mine[1][0] and mine[0][1] != mine[1][1]  # a swap would show
            wanted = [pair for pair in mine for _ in range(generations)]
            start, sampled = round_["rollout_start"], []
            for ids, mask in zip(round_["rollout_ids"], round_["rollout_mask"]):
                sampled.append((_real(ids[:start], mask[:start]), ids[start:]))
            # generate itself repeats each prompt num_generations times in a row
            assert [prompt for prompt, _ in sampled] == [p for p, _ in wanted]
            queued = []
            for b in round_["batches"]:
                for row in range(len(b["input_ids"])):
                    s, ts = b["start"], b["teacher_start"]
                    completion = _real(b["completion_ids"][row], b["completion_mask"][row])
                    assert _real(b["input_ids"][row][s:], b["attention_mask"][row][s:]) == completion
                    assert _real(b["teacher_input_ids"][row][ts:], b["teacher_attention_mask"][row][ts:]) == completion
                    queued.append((_real(b["input_ids"][row][:s], b["attention_mask"][row][:s]),
                                   _real(b["teacher_input_ids"][row][:ts], b["teacher_attention_mask"][row][:ts]),
                                   completion))
            # each completion is trained after the prompt and the teacher prompt it was sampled for
            assert [(p, t) for p, t, _ in queued] == wanted
            assert [c for _, _, c in queued] == [ids[:len(c)] for (_, ids), (_, _, c) in zip(sampled, queued)]
            assert all(len(c) > 0 for _, _, c in queued)
        assert len({tuple(c) for r in report["rounds"] for b in r["batches"] for c in b["completion_ids"]}) > 2

    steps = reports[0]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    for report in reports:
        assert [s["teacher_syncs"] for s in report["steps"]] == [s // sync_steps for s in (1, 2, 3, 4, 5)]
    for s in steps:
        if s["step"] % sync_steps:  # no sync: the teacher keeps its weights bit for bit
            assert s["teacher_moved"] == 0.0, s
        else:  # θ_T ← (1 − r)·θ_T + r·θ_S with the student of this step
            assert s["teacher_moved"] > 1e-3 and s["ema_error"] < 1e-6, s


def _completion_logprobs(model, state, record, temperature):
    """log S(y_t) of the completion tokens in float64, a plain Hugging Face forward on the given weights."""
    model.load_state_dict({k: state[k].double() for k in model.state_dict()})
    ids, mask, start = record["input_ids"], record["attention_mask"], record["start"]
    width = record["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, start - 1:start - 1 + width]
    logprobs = (logits / temperature).log_softmax(-1).gather(-1, record["completion_ids"][..., None])[..., 0]
    return logprobs[record["completion_mask"].bool()]


def test_reused_rollouts_are_weighted_by_the_ratio_of_the_moved_policy_to_the_sampling_one(tmp_path):
    """One generated batch serves 4 steps (2 micro-batches × 2 passes): each stale pass weights its tokens by
    exp(log S_now(y) − log S_rollout(y)), S_now the student trained so far, S_rollout the one that sampled y."""
    launch(["tests/distributed/reuse_ratio.py", "--out", str(tmp_path)])
    saved = torch.load(tmp_path / "reuse.pt", weights_only=False)
    temperature, weights = saved["temperature"], saved["weights"]
    model = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-student"), dtype=torch.float64).eval()
    for trained in saved["trained"]:
        assert [r["steps_done"] for r in trained] == [0, 1, 2, 3]
        for fresh, again in ((0, 2), (1, 3)):  # the second pass trains the very same rollout
            assert torch.equal(trained[fresh]["input_ids"], trained[again]["input_ids"])
        assert trained[0]["ratio"] is None  # on-policy: no ratio
        for record in trained[1:]:
            sampled = _completion_logprobs(model, weights[0], record, temperature)  # all sampled before step 1
            now = _completion_logprobs(model, weights[record["steps_done"]], record, temperature)
            expected = torch.exp((now - sampled).clamp(-20, 20))
            assert record["ratio"] is not None and record["ratio"].shape == expected.shape
            torch.testing.assert_close(record["ratio"].double(), expected, rtol=1e-5, atol=1e-7)
            # the policy moved enough for a wrong ratio to show, not so far that the clamp decides
            assert (expected - 1).abs().max() > 1e-2 and (now - sampled).abs().max() < 20
            at_one = torch.exp(_completion_logprobs(model, weights[record["steps_done"]], record, 1.0)
                               - _completion_logprobs(model, weights[0], record, 1.0))
            assert (at_one - expected).abs().max() > 1e-3  # so would a ratio taken at temperature 1
