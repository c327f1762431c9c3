"""Gather-once really is gather-once: while sdft_ds generates, ZeRO-3's hooks fetch nothing, each parameter is
gathered once per rollout whatever the decoding length, and training steps with completions of varying length
never invalidate the parameter coordinator's trace nor gather more than the step before. Counted at DeepSpeed's
own entry points on 1 and 2 ranks (tests/distributed/generation_mechanism.py)."""

import pytest

from conftest import launch, read_reports

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def reports(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"mechanism{request.param}")
    launch(["tests/distributed/generation_mechanism.py", "--out", str(out)], ranks=request.param)
    return read_reports(out, ranks=request.param)


def test_gather_once_fetches_nothing_while_decoding(reports):
    for report in reports:
        for engine in ("student", "teacher"):  # the teacher generates with generate_from_teacher
            short, long = report[f"{engine}_gather_once_4"], report[f"{engine}_gather_once_16"]
            assert "fetch_sub_module" not in short and "fetch_sub_module" not in long, report
            assert short == long  # the gathers do not grow with the tokens decoded
            if report["world_size"] > 1:
                assert short["all_gather_into_tensor"] > 0
            # the per-layer path through the hooks is what the counters would see otherwise
            assert report[f"{engine}_per_layer_16"]["fetch_sub_module"] > report[f"{engine}_per_layer_4"][
                "fetch_sub_module"] > 0


def test_an_exception_during_a_rollout_restores_hooks_and_partitions(reports):
    assert all(report["restored_after_exception"] for report in reports)


def test_training_steps_keep_their_trace_and_gather_the_same(reports):
    for report in reports:
        assert report["rollout"] == "gather_once"
        assert len(set(report["completion_tokens"])) > 2, "completions should end at different positions"
        assert all("_invalidate_trace" not in step for step in report["steps"]), report["steps"]
        assert report["trace_complete"] and report["released"]
        steady = report["steps"][2:]
        assert all(step == steady[0] for step in steady), report["steps"]
        for generation in report["in_generation"][1:]:
            assert "fetch_sub_module" not in generation
            # each partitioned (non-persistent) parameter gathered exactly once per rollout
            expected = report["partitioned_params"] if report["world_size"] > 1 else 0
            assert generation.get("all_gather_into_tensor", 0) == expected, report["in_generation"]
