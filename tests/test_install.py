"""It installs like a library. Paths written from the checkout's root (`sdft_ds/assets/...`, `ds_configs/...`)
and bare names of shipped DeepSpeed configs resolve to the package's copies from any folder, a file of that path in
the working directory winning; and a wheel built from this checkout, installed (not editable) into a fresh virtual
environment that cannot see the checkout, runs the checkout's demo recipe for 2 steps from another folder, its
assets, a bare DeepSpeed config name and the default teacher config all coming from the installed package.
Offline: the build uses the test venv's setuptools, and the fresh environment borrows its torch/deepspeed/transformers
through a .pth file (which does not run the venv's editable-install hook)."""

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sdft_ds.config import DS_CONFIG_DIR, PACKAGE_DIR, SDFTConfig, ds_config_file, package_path

from conftest import REPO, child_env
from helpers import free_port, remove_shm


def test_paths_written_from_the_checkout_root_resolve_to_the_package_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    student = "assets/models/tiny-qwen2-student"
    assert package_path(f"sdft_ds/{student}") == str(PACKAGE_DIR / student)
    assert package_path("ds_configs/zero0.json") == str(DS_CONFIG_DIR / "zero0.json")
    assert ds_config_file("zero0.json") == DS_CONFIG_DIR / "zero0.json"  # a shipped config by its bare name
    config = SDFTConfig(deepspeed="zero2.json", teacher_deepspeed="ds_configs/teacher_zero0.json")
    assert config.deepspeed == "zero2.json"  # read from the package, kept as the user wrote it
    for name in ("Qwen/Qwen3-8B", "sdft_ds/assets/models/none", "ds_configs/zero9.json", "zero9.json"):
        assert package_path(name) == name  # left as written, for the error to name
    assert ds_config_file("zero9.json") == Path("zero9.json")
    with pytest.raises(FileNotFoundError, match=r"'zero9.json' does not exist; .* zero0.json, "):
        SDFTConfig(deepspeed="zero9.json")


def test_a_file_of_that_path_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_configs").mkdir()
    for name in ("zero0.json", "ds_configs/zero0.json"):
        (tmp_path / name).write_text('{"train_micro_batch_size_per_gpu": 1, "optimizer": {}}')
        assert package_path(name) == name and ds_config_file(name) == Path(name)


def _run(command: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`command` in its own session, killed whole (launcher and ranks) if it outlives `timeout`."""
    env = child_env()
    env.pop("PYTHONPATH", None)  # nothing may point back at the checkout
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} still running after {timeout} s\n{stdout[-4000:]}\n{stderr[-6000:]}")
    assert process.returncode == 0, f"{command}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout: the build writes build/ and *.egg-info there, not into the checkout."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "sdft_ds", source / "sdft_ds", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", source, "-w", tmp_path / "dist"], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("sdft_ds-*.whl")
    return wheel


def _fresh_env(tmp_path: Path) -> Path:
    """A venv holding the wheel only; the test venv's site-packages is on its path for the dependencies (and pip)."""
    env = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp_path)
    python = env / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).stdout
                .strip())
    deps = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (site / "test_venv_dependencies.pth").write_text("".join(f"{path}\n" for path in deps))
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", _wheel(tmp_path)], cwd=tmp_path)
    return env


@pytest.mark.multirank
def test_the_wheel_installed_elsewhere_runs_the_demo_recipe_from_another_folder(tmp_path):
    env = _fresh_env(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([env / "bin" / "python", "-c", "import sdft_ds, sdft_ds.config as c; print(sdft_ds.__file__); "
                  "print(c.DS_CONFIG_DIR)"], cwd=elsewhere).stdout.splitlines()
    # the installed copy, not the checkout's
    assert all(Path(path).resolve().is_relative_to(env.resolve()) for path in where), where
    assert (Path(where[1]) / "zero3_offload.json").is_file()

    port = free_port()
    try:
        done = _run([env / "bin" / "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                     port, env / "bin" / "sdft-train", "--config", REPO / "launch" / "recipes" / "demo.yaml",
                     "--max_steps", "2", "--logging_steps", "1", "--output_dir", "out",
                     "--deepspeed", "zero3_offload.json"], cwd=elsewhere, timeout=300)
    finally:
        remove_shm(port)
    assert f"trained model saved to {(elsewhere / 'out').resolve()}" in done.stdout
    assert "held-out divergence" in done.stdout
    assert (elsewhere / "out" / "model.safetensors").is_file() and (elsewhere / "out" / "tokenizer.json").is_file()
