"""What a run reports: an offline Weights & Biases run holds the metrics, the phase timings and the sample table
of per-token divergences, and a run resumed from a checkpoint continues the same W&B run; TensorBoard is the
offline alternative. Real trainers on the shipped tiny assets, one rank, in this process."""

import importlib.util
import json

import pytest
import wandb

from conftest import REPO

from sdft_ds.tracking import read_wandb_history as wandb_history

SETTINGS = dict(max_completion_length=6, logging_steps=1, sample_table_steps=2, sample_table_rows=2,
                per_device_train_batch_size=2, seed=0)


def _trainer(out, **settings):
    from transformers import AutoTokenizer

    from sdft_ds import SDFTConfig, SDFTTrainer
    from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir

    args = SDFTConfig(output_dir=str(out), **{**SETTINGS, **settings})
    return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args,
                       processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=str(DEMO_TRAIN))


def _runs(wandb_dir):
    """{offline run folder: its run id}, oldest first."""
    folders = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    return {folder: folder.name.rsplit("-", 1)[1] for folder in folders}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "tracking"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "tracking").mkdir()
    return tmp_path / "tracking"


def test_the_offline_run_holds_timings_tables_and_a_resume_continues_it(tmp_path, offline_wandb, in_process):
    from sdft_ds import checkpoint
    from sdft_ds.tracking import PHASES

    out = tmp_path / "run"
    first = _trainer(out, max_steps=2, save_steps=2, report_to="wandb")
    first.train()
    # wandb-core writes the offline run file asynchronously: right after finish() it was still the 7-byte header in
    # about 1 run in 8 here (CI failed on it). Tearing the service down waits for its writes; a process that ends
    # does the same at exit, so a training run loses nothing.
    wandb.teardown()
    (folder, run_id), = _runs(offline_wandb).items()
    assert first.tracking_state == {"wandb_run_id": run_id}
    saved = checkpoint.load_state(out / "checkpoints" / "step-2" / checkpoint.STATE_FILE.format(rank=0))
    assert saved["tracking"] == {"wandb_run_id": run_id}  # the checkpoint names the run a resume continues

    run_file = next(folder.glob("run-*.wandb"))
    history = wandb_history(run_file)
    metrics = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in metrics] == [1, 2], (run_file.stat().st_size, history)
    for key in ("train/learning_rate", "train/tokens_per_second", "train/completion_length_p90",
                "train/completions_truncated", "train/teacher_syncs", *(f"time/{p}" for p in PHASES)):
        assert key in metrics[-1], key
    assert metrics[-1]["time/generation"] > 0
    assert metrics[-1]["train/completion_length_hist/_type"] == "histogram"  # wandb_history flattens nested keys
    assert sum(metrics[-1]["train/completion_length_hist/values"]) == metrics[-1]["train/completions"]
    # the sample table of step 2: its rows hold each completion token's divergence
    (row,) = [row for row in history if "samples/path" in row]
    assert row["_step"] == 2 and row["samples/_type"] == "table-file"
    table = json.loads((folder / "files" / row["samples/path"]).read_text())
    assert table["columns"][:4] == ["step", "prompt", "teacher_prompt", "completion"]
    assert len(table["data"]) == 2
    columns = dict(zip(table["columns"], table["data"][0]))
    assert columns["prompt"] and columns["teacher_prompt"] != columns["prompt"]
    tokens, per_token = zip(*json.loads(columns["per_token_divergence"]))  # [[token, divergence], ...]
    assert "".join(tokens) == columns["completion"] and all(v >= -1e-6 for v in per_token)
    assert columns["divergence_mean"] == pytest.approx(sum(per_token) / len(per_token), abs=1e-3)

    resumed = _trainer(out, max_steps=3, report_to="wandb", resume_from_checkpoint="latest")
    resumed.train()
    wandb.teardown()
    runs = _runs(offline_wandb)
    assert len(runs) == 2 and set(runs.values()) == {run_id}  # the same W&B run, appended to
    later = next(f for f in runs if f != folder)
    later_file = next(later.glob("run-*.wandb"))
    later_history = wandb_history(later_file)
    assert [row["_step"] for row in later_history if "train/loss" in row] == [3], (later_file.stat().st_size,
                                                                                    later_history)
    assert resumed.summary["steps"] == 3 and resumed.summary["steps_run"] == 1
    assert resumed.summary["tokens_per_second"] > 0

    # benchmarks/plot_wandb_run.py reads both folders of the run back as one history (and charts it)
    spec = importlib.util.spec_from_file_location("plot_wandb_run", REPO / "benchmarks" / "plot_wandb_run.py")
    plot_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_script)
    assert [row["_step"] for row in plot_script.merged_history(list(runs))] == [1, 2, 3]
    if importlib.util.find_spec("matplotlib"):
        plot_script.plot(plot_script.merged_history(list(runs)), tmp_path / "charts.png", run_id)
        assert (tmp_path / "charts.png").stat().st_size > 10_000


def test_no_sample_table_without_a_tracker_and_none_off_schedule(tmp_path, in_process):
    trainer = _trainer(tmp_path, max_steps=1, sample_table_steps=1)  # report_to none: nothing would show them
    assert not trainer._samples_due()
    trainer.args.report_to = "wandb"
    assert trainer._samples_due()  # step 1 is due at every 1 step
    trainer.args.sample_table_steps = 2
    assert not trainer._samples_due()


def test_sample_rows_pair_each_completion_token_with_its_divergence(tokenizer):
    import torch

    from sdft_ds.batch import micro_batch
    from sdft_ds.tracking import sample_rows

    prompts = [tokenizer("Reverse 'ab'.")["input_ids"], tokenizer("Hi")["input_ids"]]
    teacher = [p + tokenizer(" Answer: ba")["input_ids"] for p in prompts]
    first, second = tokenizer("ba.")["input_ids"], tokenizer("x")["input_ids"][:1]
    width = len(first) + 1
    completion = torch.tensor([first + [0], second + [0] * (width - 1)])
    mask = torch.tensor([[1] * len(first) + [0], [1] + [0] * (width - 1)])
    batch = micro_batch(prompts, teacher, completion, mask, torch.tensor([False, True]), pad_id=0,
                        num_loss_tokens_to_skip=0, rollout_step=0, device=torch.device("cpu"))
    n = int(batch.selected.sum())
    rows = sample_rows(batch, torch.arange(n, dtype=torch.float32), tokenizer, rows=2)
    assert [r["prompt"] for r in rows] == ["Reverse 'ab'.", "Hi"]
    assert rows[1]["teacher_prompt"] == "Hi Answer: ba"
    assert [len(r["tokens"]) for r in rows] == [int(m.sum()) for m in mask]
    assert rows[0]["completion"] == "".join(rows[0]["tokens"]) == tokenizer.decode(first)
    assert rows[0]["divergence"] == list(range(int(mask[0].sum())))  # row-major over `selected`
    assert rows[1]["divergence"] == [float(n - 1)] and rows[1]["truncated"]


def test_tensorboard_writes_scalars_and_the_sample_table_and_a_resume_continues_them(tmp_path, in_process):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _trainer(tmp_path, max_steps=2, save_steps=1, report_to="tensorboard", run_name="tb")
    first.train()
    folder = str(tmp_path / "runs" / "tb")
    assert first.tracking_state == {"tensorboard_dir": folder}
    # resumed from step 1: the same folder, the interrupted run's step 2 replaced by the resumed run's
    resumed = _trainer(tmp_path, max_steps=3, report_to="tensorboard", run_name="other",
                       resume_from_checkpoint=str(tmp_path / "checkpoints" / "step-1"))
    resumed.train()
    assert resumed.tracking_state == {"tensorboard_dir": folder}
    events = EventAccumulator(folder, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert "time/generation" in events.Tags()["scalars"]
    assert "samples/text_summary" in events.Tags()["tensors"]
    assert "train/completion_length" in events.Tags()["histograms"]


def test_report_to_is_checked_with_the_settings():
    from sdft_ds import SDFTConfig

    with pytest.raises(ValueError, match="report_to='mlflow' is not valid; choose one of none, wandb, tensorboard"):
        SDFTConfig(report_to="mlflow")
    with pytest.raises(ValueError, match="sample_table_steps must be >= 0"):
        SDFTConfig(sample_table_steps=-1)
    with pytest.raises(ValueError, match="deepspeed_log_level='loud' is not valid"):
        SDFTConfig(deepspeed_log_level="loud")
