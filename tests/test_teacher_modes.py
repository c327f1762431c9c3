"""Teacher modes, generation from the teacher and rollout reuse, on 2 ranks under ZeRO-3."""

import pytest

from conftest import launch, read_reports

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
