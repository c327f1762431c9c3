"""Helpers shared by the test files and the tests/distributed scripts, one copy each.

Test files import this module as `helpers` (pytest puts tests/ on sys.path, as for conftest). The scripts run as
`deepspeed tests/distributed/x.py`, which puts only tests/distributed/ on sys.path; they add tests/ first:

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py

Plain functions only (no pytest), and no torch or deepspeed at import: conftest imports this module.
"""

from __future__ import annotations

import argparse
import math
import socket
from pathlib import Path

TAIL_CAP = math.exp(-1e-7)  # the top-k tail keeps at least 1 − e^{−1e−7} of the mass (SPEC's clamp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_buffers(port: int) -> list[Path]:
    """The shared-memory buffers (66 MB per rank) that the deepspeed launcher leaves, named after its port."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def remove_shm(port: int) -> None:
    for f in shm_buffers(port):
        f.unlink(missing_ok=True)


def naive_divergence(s, u, *, alpha, tau=1.0, mode="full", k=None, add_tail=False, y=None):
    """D[t] from raw logits [..., V] in float64, spelled out from SPEC §2: log_softmax, explicit KL / JSD sums,
    explicit tail bucket. The teacher side is detached; gradients reach `s`."""
    import torch

    ls, lt = (s.double() / tau).log_softmax(-1), (u.detach().double() / tau).log_softmax(-1)
    if mode == "sampled_token":
        ls_y, lt_y = ls.gather(-1, y[..., None])[..., 0], lt.gather(-1, y[..., None])[..., 0]
        return (ls_y - lt_y).detach() * ls_y
    if mode == "topk":
        idx = s.detach().topk(k, -1).indices
        ls, lt = ls.gather(-1, idx), lt.gather(-1, idx)
        if add_tail:
            ls = torch.cat([ls, torch.log1p(-ls.exp().sum(-1, keepdim=True).clamp(max=TAIL_CAP))], -1)
            lt = torch.cat([lt, torch.log1p(-lt.exp().sum(-1, keepdim=True).clamp(max=TAIL_CAP))], -1)
        else:
            ls, lt = ls - ls.logsumexp(-1, keepdim=True), lt - lt.logsumexp(-1, keepdim=True)
    S, T = ls.exp(), lt.exp()
    if alpha == 0:
        return (T * (lt - ls)).sum(-1)
    if alpha == 1:
        return (S * (ls - lt)).sum(-1)
    log_m = torch.log((1 - alpha) * S + alpha * T)
    return alpha * (T * (lt - log_m)).sum(-1) + (1 - alpha) * (S * (ls - log_m)).sum(-1)


def script_out() -> Path:
    """The folder a tests/distributed script writes to, from its --out argument (the launcher adds --local_rank)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    return Path(parser.parse_args().out)


def gathered_weights(engine) -> dict:
    """The engine's LM weights in float64, gathered on rank 0 (empty elsewhere); every rank must call it."""
    from sdft_ds import engines

    return {k: v.double() for k, v in engines.consolidated_state_dict(engine).items()}


def max_difference(a: dict, b: dict) -> float | None:
    """Largest |a − b| over a's tensors, compared in float64; None for an empty `a` (a rank that holds no weights)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a) if a else None
