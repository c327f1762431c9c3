"""Peak extra memory and time of forward+backward: dense reference vs chunked linear_divergence.

    .venv/bin/python benchmarks/divergence.py > benchmarks/results/divergence_cpu.txt   # CPU, fp32, ~15 min
    python benchmarks/divergence.py --device cuda             # GPU, bf16, plus Liger-Kernel's case

CPU: every case runs in a fresh subprocess; peak extra memory = peak RSS (ru_maxrss) minus the RSS
once the inputs exist, so it counts everything the divergence allocates, grad_W included (both
paths produce it). CUDA: torch.cuda.max_memory_allocated minus the allocation after the inputs.
"total" adds the inputs (Liger-Kernel reports totals). Dense cases whose estimated footprint
(7·N·V·4 bytes for KL, 14× for JSD, plus grad_W) exceeds --dense-limit-gb (on CPU also 90% of
MemAvailable), and CPU cases estimated to run longer than --case-budget-s, are skipped and say so.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sdft_ds.divergence import linear_divergence  # noqa: E402

GB = 1e9
LIGER_CASE = dict(hidden=4096, tokens=8192, vocab=128_256)  # Liger-Kernel's JSD benchmark: 11.1 GB / 60.7 ms


def available_bytes() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(device, dtype, hidden, tokens, vocab, alpha, chunked, token_chunk, vocab_chunk, repeats,
             liger=False) -> dict:
    """One case in this process: {'peak_gb', 'seconds', 'loss'} (median over repeats; a warm-up first on CUDA).
    liger: Liger-Kernel's LigerFusedLinearJSD on the same inputs instead (its jsd_beta is our alpha at 0.5, and
    its mean over tokens is our loss with weights 1/N)."""
    dtype = getattr(torch, dtype)
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale)

    h_s = randn(tokens, hidden).requires_grad_()
    w_s = randn(vocab, hidden, scale=hidden ** -0.5).requires_grad_()
    h_t, w_t = randn(tokens, hidden), randn(vocab, hidden, scale=hidden ** -0.5)
    weights = torch.full((tokens,), 1.0 / tokens, device=device)
    kw = dict(alpha=alpha, chunked=chunked, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    if liger:
        from liger_kernel.transformers import LigerFusedLinearJSD

        fused = LigerFusedLinearJSD(jsd_beta=alpha)
    losses = []

    def step():
        h_s.grad = w_s.grad = None
        loss = fused(h_s, w_s, h_t, w_t, None) if liger else linear_divergence(h_s, w_s, h_t, w_t, weights, **kw).loss
        loss.backward()
        losses.append(loss.detach())

    if device == "cuda":
        step()  # warm-up
        h_s.grad = w_s.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    if device == "cuda":
        total = torch.cuda.max_memory_allocated()
        return dict(peak_gb=(total - base) / GB, total_gb=total / GB, seconds=seconds, loss=losses[-1].item())
    return dict(peak_gb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / GB, seconds=seconds,
                loss=losses[-1].item())


def in_subprocess(case: dict) -> dict:
    """A fresh process, so ru_maxrss is this case's own peak."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_gflops(device, dtype) -> float:
    """Calibration for the CPU time estimate."""
    a, b = torch.randn(1024, 1024, device=device, dtype=dtype), torch.randn(1024, 4096, device=device, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024 * 1024 * 4096 / (time.perf_counter() - t0) / 1e9


def estimates(hidden, tokens, vocab, alpha, chunked, one_tile):
    """(bytes, output-layer GEMMs of 2·N·H·V FLOPs) for the dense reference or the chunked path."""
    grad_w = vocab * hidden * 4
    if not chunked:
        return (7 if alpha in (0, 1) else 14) * tokens * vocab * 4 + grad_w, 4
    gemms = 4 if one_tile else (6 if alpha in (0, 1) else 8)  # recomputed tiles: DIVERGENCE_MATH.md passes
    return grad_w, gemms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, nargs="+", default=[896, 3584])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--token-chunk", type=int, default=None, help="default: linear_divergence's")
    p.add_argument("--vocab-chunk", type=int, default=None, help="default: linear_divergence's")
    p.add_argument("--dense-limit-gb", type=float, default=None, help="default: 20 on CPU, 90%% of the GPU")
    p.add_argument("--case-budget-s", type=float, default=90.0, help="CPU: skip cases estimated to take longer")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_case(**json.loads(args.one))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    defaults = linear_divergence.__kwdefaults__
    token_chunk = args.token_chunk or defaults["token_chunk"]
    vocab_chunk = args.vocab_chunk or defaults["vocab_chunk"]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gflops = matmul_gflops(args.device, dtype)
    cases = [(h, n, args.vocab, a) for h in args.hidden for n in args.tokens for a in args.alphas]
    if args.device == "cuda":
        cases.append((LIGER_CASE["hidden"], LIGER_CASE["tokens"], LIGER_CASE["vocab"], 0.5))

    print(f"$ {os.path.relpath(sys.executable)} {' '.join(sys.argv)}")
    print(f"device={args.device} dtype={str(dtype).split('.')[-1]} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} matmul≈{gflops:.0f} GFLOP/s, token_chunk={token_chunk}, "
          f"vocab_chunk={vocab_chunk}")
    print("peak = extra memory over the inputs (GB, grad_W included; on CUDA also the total with the inputs); "
          "time = forward+backward (s); load = 1-min load average after the row (the machine is shared)\n")
    print("| H | N | V | α | dense peak | chunked peak | peak ratio | dense time | chunked time | time ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for hidden, tokens, vocab, alpha in cases:
        row = {}
        for chunked in (False, True):
            mem, gemms = estimates(hidden, tokens, vocab, alpha, chunked, vocab_chunk >= vocab)
            est_s = gemms * 2 * tokens * hidden * vocab / gflops / 1e9
            limit = (args.dense_limit_gb or 20) * GB
            if args.device == "cpu":
                limit = min(limit, 0.9 * available_bytes())
            elif args.dense_limit_gb is None:
                limit = 0.9 * torch.cuda.get_device_properties(0).total_memory
            if not chunked and mem > limit:
                row[chunked] = f"skipped (would need {mem / GB:.0f} GB)"
                continue
            if args.device == "cpu" and est_s > args.case_budget_s:
                row[chunked] = f"skipped (est. {est_s:.0f} s > {args.case_budget_s:.0f} s budget)"
                continue
            case = dict(device=args.device, dtype=str(dtype).split(".")[-1], hidden=hidden, tokens=tokens,
                        vocab=vocab, alpha=alpha, chunked=chunked, token_chunk=token_chunk,
                        vocab_chunk=vocab_chunk, repeats=1 if args.device == "cpu" and est_s > 20 else 3)
            if args.device == "cuda":
                try:
                    row[chunked] = run_case(**case)
                except torch.cuda.OutOfMemoryError:
                    row[chunked] = dict(error="out of memory")
                torch.cuda.empty_cache()
            else:
                row[chunked] = in_subprocess(case)
        print(format_row(hidden, tokens, vocab, alpha, row[False], row[True]), flush=True)
    if args.device == "cuda":
        liger_row(dict(device="cuda", dtype="bfloat16", **LIGER_CASE, alpha=0.5, chunked=True,
                       token_chunk=token_chunk, vocab_chunk=vocab_chunk, repeats=3))


def liger_row(case: dict) -> None:
    """Liger-Kernel itself on the last case (its own JSD benchmark's shape), against our chunked path, in this run."""
    if importlib.util.find_spec("liger_kernel") is None:
        print("\nLiger-Kernel not installed: its case ran ours only (pip install liger-kernel to compare)")
        return
    ours, theirs = run_case(**case), run_case(**dict(case, liger=True))
    torch.cuda.empty_cache()
    print(f"\nLiger-Kernel LigerFusedLinearJSD vs linear_divergence, H={case['hidden']} N={case['tokens']} "
          f"V={case['vocab']:,} alpha={case['alpha']:g} {case['dtype']}:")
    print("| | peak GB (total) | time s | loss |\n|---|---|---|---|")
    for name, r in (("liger", theirs), ("sdft_ds chunked", ours)):
        print(f"| {name} | {r['peak_gb']:.2f} ({r['total_gb']:.1f}) | {r['seconds']:.4f} | {r['loss']:.6f} |")
    print(f"ours/liger: time {ours['seconds'] / theirs['seconds']:.2f}×, peak {ours['peak_gb'] / theirs['peak_gb']:.2f}×,"
          f" loss rel. diff {abs(ours['loss'] - theirs['loss']) / abs(theirs['loss']):.1e}")


def format_row(hidden, tokens, vocab, alpha, dense, chunked) -> str:
    def cells(r):
        if isinstance(r, str):
            return [r, ""]
        if "error" in r:
            return [f"error: {r['error']}", ""]
        total = f" (total {r['total_gb']:.1f})" if "total_gb" in r else ""
        return [f"{r['peak_gb']:.2f}{total}", f"{r['seconds']:.2f}"]

    d, c = cells(dense), cells(chunked)
    both = isinstance(dense, dict) and isinstance(chunked, dict) and "error" not in dense and "error" not in chunked
    peak_ratio = f"{chunked['peak_gb'] / dense['peak_gb']:.1%}" if both else ""
    time_ratio = f"{chunked['seconds'] / dense['seconds']:.2f}×" if both else ""
    cells = [hidden, tokens, f"{vocab:,}", f"{alpha:g}", d[0], c[0], peak_ratio, d[1], c[1], time_ratio,
             f"{os.getloadavg()[0]:.1f}"]
    return "| " + " | ".join(str(x) for x in cells) + " |"


if __name__ == "__main__":
    main()
