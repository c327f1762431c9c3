"""Nothing lost, nothing hung: non-finite numbers, interrupted or foreign checkpoints, ranks that disagree. Each
case runs real engines or real checkpoint files and is refused by name, before any engine where it can be."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, launch, read_reports
from helpers import free_port, remove_shm
from sdft_ds import checkpoint
from sdft_ds.checkpoint import COMPLETE, STATE_FILE, CheckpointError


# ---------------------------------------------------------------- numbers that go wrong

@pytest.mark.multirank
@pytest.mark.parametrize("config", [None, "ds_configs/zero0.json"], ids=["zero3-offload", "zero0-fp32"])
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, config):
    launch(["tests/distributed/nonfinite.py", "--out", str(tmp_path), *(["--deepspeed", config] if config else [])])
    for report in read_reports(tmp_path):
        assert report["first_step_applied"]
        # NaN in one rank's part of the teacher: both ranks skip, count, and stop at the third in a row
        assert report["outcomes"][:2] == [[False, 1, 1], [False, 2, 2]], report
        assert "3 optimizer steps in a row" in report["outcomes"][2]
        assert "weights are those of step 1" in report["outcomes"][2]
        assert report["recovered"] == [True, 0, None], report  # Adam's moments were not poisoned
        # NaN in rank 1's part of the student: neither exported nor saved, on any rank
        assert not report["export_exists"] and not report["checkpoint_exists"]
    rank0, rank1 = read_reports(tmp_path)
    assert rank0["student_moved_while_nonfinite"] == 0.0  # bit for bit: the skipped steps moved nothing
    assert rank0["student_moved_after"] > 0
    assert "model.embed_tokens.weight" in rank1["export"] and "not exported" in rank1["export"]
    assert "not saved" in rank1["checkpoint"]
    assert "another rank" in rank0["export"] and "another rank" in rank0["checkpoint"]


# ---------------------------------------------------------------- checkpoints: complete, ours, resumable

def _checkpoint(folder: Path, step: int, ranks: int = 2, complete: bool = True, fingerprint: dict | None = None) -> Path:
    """The files a save leaves: each rank's state file, DeepSpeed's `latest`, and the completion record last."""
    path = folder / "checkpoints" / f"step-{step}"
    for rank in range(ranks):
        checkpoint.save_state({"step": step}, path / STATE_FILE.format(rank=rank))
    (folder / "checkpoints" / "latest").write_text(path.name)
    if complete:
        checkpoint.mark_complete(path, {"step": step, "world_size": ranks, "fingerprint": fingerprint or {}})
    return path


def test_latest_naming_an_interrupted_save_resumes_the_complete_checkpoint_before_it(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 7)
    _checkpoint(tmp_path, 3, complete=False)  # killed after DeepSpeed wrote `latest`, before the record
    with caplog.at_level("WARNING", logger="sdft_ds.checkpoint"):
        folder, tag, record = checkpoint.open_checkpoint("latest", str(tmp_path), rank=1, world_size=2)
    assert tag == "step-2" and record["state"]["step"] == 2  # step-7 is numbered above: another history
    assert "step-3 was never completed" in caplog.text


def test_a_checkpoint_that_was_never_completed_is_refused_when_named(tmp_path):
    step = _checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(CheckpointError, match="step-3 was never completed"):
        checkpoint.open_checkpoint(str(step), str(tmp_path), rank=0, world_size=2)


@pytest.mark.parametrize("damage, rank, world_size, message", [
    ("state", 1, 2, r"sdft_state-rank1.pt cannot be read \(UnpicklingError"),
    ("record", 0, 2, r"sdft_complete.json is damaged"),
    (None, 0, 1, r"holds the state of 2 rank\(s\) and this run has 1"),
    ("node-local", 1, 2, r"rank 1 finds no sdft_state-rank1.pt on its disk \(were the checkpoints written with "
                         r"save_on_each_node"),
])
def test_damaged_or_mismatched_checkpoints_are_named(tmp_path, damage, rank, world_size, message):
    step = _checkpoint(tmp_path, 4)
    if damage == "state":
        (step / STATE_FILE.format(rank=1)).write_bytes(b"not a torch file")
    elif damage == "record":
        (step / COMPLETE).write_text("{")
    elif damage == "node-local":
        (step / STATE_FILE.format(rank=1)).unlink()
    with pytest.raises(CheckpointError, match=message):
        checkpoint.open_checkpoint(str(step), str(tmp_path), rank=rank, world_size=world_size)


def _trainer(tmp_path, **settings):
    from transformers import AutoTokenizer

    from sdft_ds import SDFTConfig, SDFTTrainer
    from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir

    args = SDFTConfig(**{"output_dir": str(tmp_path), "max_steps": 1, "max_completion_length": 4, **settings})
    return SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=args,
                       processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR), train_dataset=str(DEMO_TRAIN))


def test_a_new_run_refuses_an_output_dir_with_an_earlier_runs_checkpoints(tmp_path, in_process):
    _checkpoint(tmp_path, 30, ranks=1)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(step-30\).*--overwrite_output_dir"):
        _trainer(tmp_path)
    assert time.perf_counter() - started < 30  # before any engine
    assert (tmp_path / "checkpoints" / "step-30" / COMPLETE).is_file()  # nothing deleted without being asked
    trainer = _trainer(tmp_path, overwrite_output_dir=True)
    assert not (tmp_path / "checkpoints").exists()  # a later `latest` cannot find the old run
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "model.safetensors").is_file()


def test_the_same_run_resubmitted_resumes_only_when_asked(tmp_path, in_process):
    first = _trainer(tmp_path, max_steps=2)
    first.train_step()
    first.save_checkpoint()
    again = _trainer(tmp_path, max_steps=2)  # its own checkpoints: Hugging Face's idiom resumes in train()
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(step-1\)"):
        again.train()
    again.train(resume_from_checkpoint="latest")
    assert again.step == 2 and (tmp_path / "checkpoints" / "step-1" / COMPLETE).is_file()


def test_resume_refuses_a_checkpoint_saved_with_other_data_or_batch_geometry(tmp_path, in_process):
    saved = {"per_device_train_batch_size": 4, "dataset": "16 rows, tokens sha256 0123456789abcdef"}
    _checkpoint(tmp_path, 5, ranks=1, fingerprint=saved)
    with pytest.raises(CheckpointError, match=r"saved by a run with other data.*dataset: '16 rows.*"
                                              r"per_device_train_batch_size: 4 -> 1"):
        _trainer(tmp_path, resume_from_checkpoint="latest")


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_engine(tmp_path, in_process):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"output_dir .*a-file/run cannot be written"):
        _trainer(tmp_path / "a-file" / "run")


def test_the_export_is_readable_by_others_and_the_upload_skips_training_state(tmp_path):
    from huggingface_hub.utils import filter_repo_objects
    from transformers import AutoModelForCausalLM

    from sdft_ds.assets import model_dir

    lm = AutoModelForCausalLM.from_pretrained(model_dir("tiny-qwen2-student"))
    previous = os.umask(0o022)
    try:
        checkpoint.write_pretrained(lm, lm.state_dict(), None, str(tmp_path / "export"))
    finally:
        os.umask(previous)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "export").iterdir()} == {
        "config.json": 0o644, "generation_config.json": 0o644, "model.safetensors": 0o644}
    files = ["model.safetensors", "config.json", "checkpoints/step-3/mp_rank_00_model_states.pt", "wandb/run/x.wandb",
             "runs/events.out", ".sdft.partial"]
    assert list(filter_repo_objects(files, ignore_patterns=checkpoint.UPLOAD_IGNORE)) == files[:2]


# ---------------------------------------------------------------- ranks agree or fail together

@pytest.mark.multirank
def test_ranks_given_different_datasets_fail_together_instead_of_hanging(tmp_path):
    port = free_port()
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                               str(port), "tests/distributed/sharded_data.py", "--out", str(tmp_path)], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=600)
    finally:
        remove_shm(port)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "prompt rows per rank: 16 to 24" in log, log[-3000:]
    assert time.perf_counter() - started < 300


@pytest.mark.multirank
def test_a_rank_killed_in_the_middle_of_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    out, port = tmp_path / "run", free_port()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               "launch/train.py", "--config", "launch/recipes/demo.yaml", "--output_dir", str(out), "--max_steps", "5",
               "--save_steps", "1", "--logging_steps", "1"]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    target = out / "checkpoints" / "step-3" / STATE_FILE.format(rank=1)
    try:
        while not target.exists() and process.poll() is None:  # rank 1 has begun saving step 3
            time.sleep(0.002)
        for pid in Path("/proc").iterdir():
            try:
                cmdline = (pid / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if b"--local_rank=1" in cmdline and str(out).encode() in cmdline:
                os.kill(int(pid.name), signal.SIGKILL)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        remove_shm(port)
    assert process.returncode != 0
    complete = sorted(int(p.parent.name.removeprefix("step-")) for p in (out / "checkpoints").glob(f"*/{COMPLETE}"))
    # Killed mid-save, step-3 never completes whatever DeepSpeed wrote of it; on a machine so loaded that the kill
    # came after the save, the newest complete one is simply resumed.
    assert complete and complete[-1] >= 2, complete

    port = free_port()
    try:
        done = subprocess.run(command[:6] + [str(port)] + command[7:] + ["--resume_from_checkpoint", "latest"],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    finally:
        remove_shm(port)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"optimizer steps {complete[-1]} -> 5" in done.stdout + done.stderr
    assert (out / "model.safetensors").is_file()
    assert torch.load(out / "checkpoints" / "step-5" / STATE_FILE.format(rank=1), weights_only=False)["step"] == 5


FULL_DISK = """
import resource, signal, sys
from transformers import AutoTokenizer
from sdft_ds import SDFTConfig, SDFTTrainer
from sdft_ds.assets import DEMO_TRAIN, TOKENIZER_DIR, model_dir
trainer = SDFTTrainer(model=str(model_dir("tiny-qwen2-student")), args=SDFTConfig(output_dir=sys.argv[1], max_steps=3,
                      max_completion_length=4), processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                      train_dataset=str(DEMO_TRAIN))
trainer.train_step()
trainer.save_checkpoint()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
trainer.train_step()
try:
    trainer.save_checkpoint()
except OSError as error:
    print("REFUSED", error)
"""


@pytest.mark.parametrize("limit", [2_000, 200_000], ids=["own-state-file", "deepspeed-files"])
def test_a_checkpoint_that_cannot_be_written_says_so_and_leaves_the_previous_one(tmp_path, limit):
    from conftest import run_python

    done = run_python(["-c", FULL_DISK, str(tmp_path), str(limit)])
    assert "REFUSED Writing checkpoint" in done.stdout and "step-2 failed" in done.stdout, done.stdout[-3000:]
    assert "GiB are free on its disk" in done.stdout
    _, tag, _ = checkpoint.open_checkpoint("latest", str(tmp_path), rank=0, world_size=1)
    assert tag == "step-1"
