"""The documented launch commands, run as launch/README.md writes them, on CPU: pre-emption with SIGUSR1 through
launch/run.sh, two nodes on one machine with `--no_ssh` and a hostfile, and launch/slurm.sbatch under a stand-in
`srun`/`scontrol`. A "node" is a folder holding links to the repository (as each node has the checkout) and its own
`out/` (its local disk); the nodes rendezvous for real at 127.0.0.1."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env
from helpers import free_port, remove_shm

pytestmark = pytest.mark.multirank

RUN_SH = "launch/run.sh"
DEMO = ["launch/train.py", "--config", "launch/recipes/demo.yaml", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def env() -> dict:
    return child_env(PYTHONUNBUFFERED="1")  # conftest puts the venv's `deepspeed` (run.sh runs it) on PATH


def _checkout(folder: Path) -> Path:
    """A node's (or a login node's) working copy: links to what the commands name, relative to the repository."""
    folder.mkdir(parents=True)
    for name in ("launch", "sdft_ds", "ds_configs"):
        (folder / name).symlink_to(REPO / name)
    return folder


def _finish(process: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{process.args} still running after {timeout} s\n{log.read_text()[-6000:]}")


def _nodes(base: Path, hostfile: Path, env: dict, *args: str, timeout: float = 300) -> list[str]:
    """launch/README.md's per-node `--no_ssh` command in each node's folder, all at once; their logs."""
    logs, processes, port = [], [], free_port()
    try:
        for node in range(2):
            log = base / f"node{node}" / f"launch-{len(list(base.glob(f'node{node}/launch-*')))}.log"
            command = [RUN_SH, "--log_level", "info",  # the launcher's node lines, which the tests read
                       "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
                       "127.0.0.1", "--master_port", str(port), *DEMO, *args]
            with log.open("w") as sink:
                processes.append(subprocess.Popen(command, cwd=log.parent, env=env, stdout=sink,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            logs.append(log)
        codes = [_finish(p, log, timeout) for p, log in zip(processes, logs)]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        remove_shm(port)
    texts = [log.read_text() for log in logs]
    report = [f"--- node {node} exited {code}\n{text[-5000:]}" for node, (code, text) in enumerate(zip(codes, texts))]
    assert codes == [0, 0], "\n".join(report)
    return texts


def _replica(node: Path, tag: str) -> dict:
    """The student as this node's first rank saved it (ZeRO-0, save_on_each_node: each node writes its whole copy)."""
    path = node / "out" / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, env):
    """Two nodes × one CPU rank, node-local disks: 2 optimizer steps of the demo under ZeRO-0, saved on each node."""
    base = tmp_path_factory.mktemp("nodes")
    for node in range(2):
        _checkout(base / f"node{node}")
    hostfile = base / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")  # with --no_ssh only the count and slots matter
    logs = _nodes(base, hostfile, env, "--output_dir", "out", "--deepspeed", "ds_configs/zero0.json",
                  "--save_on_each_node", "true", "--max_steps", "2", "--save_steps", "2")
    return base, hostfile, env, logs


def test_two_nodes_without_ssh_train_one_model(two_nodes):
    base, _, _, logs = two_nodes
    for node, log in enumerate(logs):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in log and "dist_world_size=2" in log, log[-3000:]
    assert "optimizer steps 0 -> 2" in logs[0], logs[0][-3000:]
    node0, node1 = _replica(base / "node0", "step-2"), _replica(base / "node1", "step-2")
    assert node0.keys() == node1.keys() and len(node0) > 5
    # Each node updated its own copy with the gradients averaged over both: the copies stay bitwise equal.
    assert all(torch.equal(node0[k], node1[k]) for k in node0)
    from safetensors.torch import load_file

    from sdft_ds.assets import model_dir

    start = load_file(model_dir("tiny-qwen2-student") / "model.safetensors")
    assert max((node0["lm." + k].float() - v.float()).abs().max().item() for k, v in start.items()) > 1e-4
    assert (base / "node0" / "out" / "model.safetensors").is_file()  # the export: rank 0's disk only
    assert not (base / "node1" / "out" / "model.safetensors").exists()


def test_two_nodes_resume_from_their_own_disks(two_nodes):
    base, hostfile, env, _ = two_nodes
    logs = _nodes(base, hostfile, env, "--output_dir", "out", "--deepspeed", "ds_configs/zero0.json",
                  "--save_on_each_node", "true", "--max_steps", "3", "--save_steps", "1",
                  "--resume_from_checkpoint", "latest")
    assert "optimizer steps 2 -> 3" in logs[0] and "step 3:" in logs[0] and "step 2:" not in logs[0], logs[0][-3000:]
    node0, node1 = _replica(base / "node0", "step-3"), _replica(base / "node1", "step-3")
    assert all(torch.equal(node0[k], node1[k]) for k in node0)


FAKE_SRUN = """#!/usr/bin/env bash
# srun [--options] COMMAND...: one task per node, all on this machine, SLURM_NODEID 0..SLURM_NNODES-1.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames NODELIST: the job's nodes, one a line (both this machine; the first is the master).
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\\nlocalhost\\n'
"""


def _sbatch(job: Path, env: dict, job_id: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    port = free_port()
    env = {**env, "SLURM_JOB_NAME": "sdft", "SLURM_JOB_ID": str(job_id),
           "SLURM_JOB_NODELIST": "node-[001-002]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "1",
           "MASTER_PORT": str(port)}
    try:  # sbatch runs the script with bash in the submission folder; the #SBATCH lines are comments to bash
        return subprocess.run(["bash", "launch/slurm.sbatch", "launch/recipes/demo.yaml", *args], cwd=job, env=env,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
    finally:
        remove_shm(port)


def test_slurm_script_trains_two_nodes_and_resumes(tmp_path, env):
    """launch/slurm.sbatch as SLURM runs it (bash, in the submission folder, SLURM_* set, `srun` one task per node),
    with a shared output folder: 2 steps, then the resubmission with `--resume_from_checkpoint latest`."""
    job, bin_dir, out = _checkout(tmp_path / "job"), tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}
    first = _sbatch(job, env, 101, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
                    "--logging_steps", "1")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-6000:]
    assert (job / "logs" / "sdft-101.hostfile").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    complete = json.loads((out / "checkpoints" / "step-2" / "sdft_complete.json").read_text())
    assert complete["world_size"] == 2  # a rank on each node trained
    assert "optimizer steps 0 -> 2" in first.stdout + first.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-2"

    again = _sbatch(job, env, 102, "--output_dir", str(out), "--max_steps", "3", "--logging_steps", "1",
                    "--resume_from_checkpoint", "latest")
    log = again.stdout + again.stderr
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-6000:]
    assert "optimizer steps 2 -> 3" in log and "step 3:" in again.stdout and "step 2:" not in again.stdout, log[-4000:]
    assert (out / "model.safetensors").is_file()


def _left_in_group(pgid: int, grace: float) -> list[str]:
    """The processes of group `pgid` still there after up to `grace` seconds."""
    import psutil

    deadline = time.monotonic() + grace
    while True:
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if os.getpgid(p.pid) == pgid:
                    left.append(f"{p.pid} {p.status()}: {' '.join(p.info['cmdline'] or [])}")
            except (ProcessLookupError, psutil.Error):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_sigusr1_to_the_whole_job_saves_and_the_launcher_reports_it(tmp_path, env):
    """SLURM's `--signal=USR1@T` (or `kill -USR1 -- -PGID`) reaches every process of the job. Through launch/run.sh
    DeepSpeed's runner and launcher ignore it, wait for the ranks to save, and return their exit code, 128 + 10; a
    plain `deepspeed` dies of the signal at once (Popen's returncode -10), leaving its ranks unsupervised."""
    out, port = tmp_path / "run", free_port()
    command = [RUN_SH, "--num_gpus", "2", "--master_port", str(port), *DEMO, "--output_dir", str(out),
               "--max_steps", "40", "--save_steps", "100"]  # stopped long before: however late the signal lands
    process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    lines, signalled = [], None
    try:
        for line in process.stdout:
            lines.append(line)
            if "step 1:" in line:
                os.killpg(process.pid, signal.SIGUSR1)
                signalled = time.monotonic()
                break
        code = process.wait(timeout=300)  # the command, not its output: a dead launcher returns at once
        waited = time.monotonic() - (signalled or 0)
        lines.extend(process.stdout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        remove_shm(port)
    log = "".join(lines)
    assert signalled is not None, log[-4000:]
    assert code == 128 + signal.SIGUSR1, (code, log[-4000:])
    assert "stopped by signal 10" in log, log[-4000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped = re.search(r"stopped by signal 10 after optimizer step (\d+)", log)
    assert stopped and tag == f"step-{stopped.group(1)}", (tag, log[-4000:])  # the step under way at the signal
    assert not (out / "model.safetensors").exists()
    left = _left_in_group(process.pid, grace=5)
    assert not left, left  # nothing of the job outlives the command
    print(f"SIGUSR1 to exit: {waited:.1f} s")

    port, saved = free_port(), int(tag.removeprefix("step-"))
    try:  # max_steps may change on resume
        done = subprocess.run([RUN_SH, "--num_gpus", "2", "--master_port", str(port), *DEMO, "--output_dir", str(out),
                               "--max_steps", str(saved + 2), "--resume_from_checkpoint", "latest"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        remove_shm(port)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"optimizer steps {saved} -> {saved + 2}" in done.stdout + done.stderr
    assert f"step {saved + 2}:" in done.stdout and (out / "model.safetensors").is_file()
