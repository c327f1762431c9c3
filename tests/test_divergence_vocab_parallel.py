"""Vocabulary-parallel linear_divergence on 2 gloo CPU ranks equals the single-process result.

Each rank gets the same tokens and its own uneven slice of both weights' vocabulary rows; the
loss and per-token values must be identical on both ranks, grad_h complete on each, and the grad_W
slices must concatenate to the single-process grad_W.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from sdft_ds.divergence import linear_divergence

WORLD = 2
N, H_S, H_T = 47, 16, 24
# several vocabulary tiles per rank, or one tile per rank kept across the passes (the default layout)
LAYOUTS = {"streamed": dict(token_chunk=13, vocab_chunk=5), "one-tile": dict(token_chunk=13, vocab_chunk=1000)}
# vocabulary sizes and each rank's slice; in the first, top_k = 8 exceeds rank 1's 6 rows
SPLITS = {13: [7, 6], 123: [70, 53]}
CASES = {
    "full-kl": dict(alpha=0.0),
    "full-jsd": dict(alpha=0.5, temperature=0.7),
    "full-rkl-is": dict(alpha=1.0, rollout=True, is_clip=1.5),
    "topk": dict(alpha=0.3, mode="topk", top_k=8),
    "topk-tail": dict(alpha=0.0, mode="topk", top_k=8, add_tail=True),
    "sampled_token": dict(alpha=1.0, mode="sampled_token"),
}


def make_inputs(v):
    g = torch.Generator().manual_seed(v)
    x = dict(h_s=0.5 * torch.randn(N, H_S, generator=g, dtype=torch.float64),  # logits ~ N(0, 4)
             w_s=torch.randn(v, H_S, generator=g, dtype=torch.float64),
             h_t=torch.randn(N, H_T, generator=g, dtype=torch.float64),
             w_t=torch.randn(v, H_T, generator=g, dtype=torch.float64),
             weights=torch.rand(N, generator=g, dtype=torch.float64),
             y=torch.randint(0, v, (N,), generator=g))
    x["rollout"] = torch.randn(N, generator=g, dtype=torch.float64) - 3
    return x


def run(v, case, layout, rows=slice(None), group=None):
    x = make_inputs(v)
    kw = dict(CASES[case])
    rollout = x["rollout"] if kw.pop("rollout", False) else None
    h_s, w_s = x["h_s"].requires_grad_(), x["w_s"][rows].clone().requires_grad_()
    out = linear_divergence(h_s, w_s, x["h_t"], x["w_t"][rows], x["weights"], target_ids=x["y"],
                            rollout_logprobs=rollout, process_group=group, **kw, **LAYOUTS[layout])
    out.loss.backward()
    return dict(out._asdict(), grad_h=h_s.grad, grad_w=w_s.grad)


def _rank(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for v, sizes in SPLITS.items():
        lo = sum(sizes[:rank])
        for case in CASES:
            for layout in LAYOUTS:
                results[v, case, layout] = run(v, case, layout, slice(lo, lo + sizes[rank]), dist.group.WORLD)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_rank, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("v", SPLITS)
def test_vocab_parallel_matches_single_process(ranks, v, case, layout):
    torch.set_num_threads(1)
    want = run(v, case, layout)
    key = v, case, layout
    for got in (r[key] for r in ranks):
        for name in ["loss", "per_token", "entropy", "target_logprob", "ratio", "grad_h"]:
            if want[name] is None:
                assert got[name] is None, name
            else:
                torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(torch.cat([r[key]["grad_w"] for r in ranks]), want["grad_w"], rtol=1e-10, atol=1e-10)
    for name in ["loss", "per_token"]:  # the same bits on every rank
        assert torch.equal(ranks[0][key][name], ranks[1][key][name]), name
