"""sdft_ds.divergence against a naive full-logits reference (SPEC §2 formulas, `helpers.naive_divergence`)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import naive_divergence
from sdft_ds.divergence import LogitTransform, dense_divergence, linear_divergence, target_logprobs

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add contention (on a busy 2-core CI box, ~100× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALPHAS = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
TAUS = [1.0, 0.7]
# (mode, add_tail): the supports of SPEC §2
SUPPORTS = [("full", False), ("topk", False), ("topk", True)]
N, V, H_S, H_T, K = 47, 123, 16, 24, 9  # N, V divisible by neither chunk below
CHUNKS = dict(token_chunk=13, vocab_chunk=31)


def make_inputs(dtype=torch.float64, seed=0, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    h_s = (torch.randn(n, H_S, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w_s = torch.randn(v, H_S, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    # teacher close to the student (as in SDFT) plus noise, in another hidden size
    h_t = torch.cat([h_s.detach().double(), torch.randn(n, H_T - H_S, generator=g, dtype=torch.float64)], 1)
    w_t = torch.cat([w_s.detach().double(), 0.3 * torch.randn(v, H_T - H_S, generator=g, dtype=torch.float64)], 1)
    w_t = w_t + 0.5 * torch.randn(v, H_T, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[::5] = 0.0
    y = torch.randint(0, v, (n,), generator=g)
    rollout = torch.randn(n, generator=g, dtype=torch.float64) - 4.0
    return dict(h_s=h_s, w_s=w_s, h_t=h_t.to(dtype), w_t=w_t.to(dtype), weights=weights, y=y, rollout=rollout)


def naive_linear(x, *, alpha, tau, mode="full", k=None, add_tail=False, rollout=None, is_clip=None, softcap=None,
                 scale=1.0):
    """Loss and metrics in fp64 from the same inputs (cast to fp64, so bf16 inputs are compared exactly); logits
    capped as Gemma 2's output layer (cap·tanh(x/cap)) and scaled as Cohere's when asked."""
    h_s, w_s = x["h_s"].detach().double().requires_grad_(), x["w_s"].detach().double().requires_grad_()
    s, u = h_s @ w_s.T, x["h_t"].double() @ x["w_t"].double().T
    if x["h_s"].dtype != torch.float64:  # logits as the low-precision GEMM rounds them, exact gradients
        s = s + ((x["h_s"] @ x["w_s"].T).double() - s).detach()
        u = (x["h_t"] @ x["w_t"].T).double()
    s, u = s * scale, u * scale
    if softcap is not None:
        s, u = softcap * torch.tanh(s / softcap), softcap * torch.tanh(u / softcap)
    per_token = naive_divergence(s, u, alpha=alpha, tau=tau, mode=mode, k=k, add_tail=add_tail, y=x["y"])
    ls = F.log_softmax(s.detach() / tau, -1)
    target_logprob = ls.gather(-1, x["y"][:, None])[:, 0]
    weights = x["weights"].double()
    ratio = None
    if rollout is not None:
        ratio = torch.exp((target_logprob - rollout).clamp(-20, 20))
        ratio = ratio if is_clip is None else ratio.clamp(max=is_clip)
        weights = weights * ratio
    loss = (weights * per_token).sum()
    loss.backward()
    return dict(loss=loss.detach(), per_token=per_token.detach(), entropy=-(ls.exp() * ls).sum(-1),
                target_logprob=target_logprob, ratio=ratio, grad_h=h_s.grad, grad_w=w_s.grad)


def run_linear(x, **kw):
    x["h_s"].grad = x["w_s"].grad = None
    out = linear_divergence(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["weights"], target_ids=x["y"], **kw)
    out.loss.backward()
    return dict(out._asdict(), grad_h=x["h_s"].grad, grad_w=x["w_s"].grad)


def assert_matches(got, want, rtol=1e-10, atol=1e-10):
    for name, w in want.items():
        if w is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name].double(), w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


GRID = [(a, t, m, tail) for a in ALPHAS for t in TAUS for m, tail in SUPPORTS] + [
    (1.0, t, "sampled_token", False) for t in TAUS
]


# streamed: several vocabulary tiles per token chunk (recomputed each pass); one-tile: vocab_chunk >= V,
# the tile is kept across passes; dense: the reference path
PATHS = {"streamed": dict(chunked=True, **CHUNKS), "one-tile": dict(chunked=True, token_chunk=13, vocab_chunk=V),
         "dense": dict(chunked=False)}


@pytest.mark.parametrize("alpha,tau,mode,add_tail", GRID)
@pytest.mark.parametrize("path", PATHS)
def test_linear_matches_naive_fp64(alpha, tau, mode, add_tail, path):
    x = make_inputs()
    kw = dict(alpha=alpha, tau=tau, mode=mode, k=K, add_tail=add_tail)
    want = naive_linear(x, **kw)
    got = run_linear(x, alpha=alpha, temperature=tau, mode=mode, top_k=K, add_tail=add_tail, **PATHS[path])
    assert got["per_token"].dtype == torch.float64
    assert_matches(got, want)


@pytest.mark.parametrize("alpha,mode,add_tail", [(0.0, "full", False), (0.5, "full", False), (1.0, "full", False),
                                                 (0.5, "topk", False), (0.5, "topk", True),
                                                 (1.0, "sampled_token", False)])
@pytest.mark.parametrize("head", [dict(softcap=2.5), dict(scale=0.3), dict(scale=2.0, softcap=3.0)],
                         ids=["softcap", "scale", "both"])
@pytest.mark.parametrize("path", PATHS)
def test_logit_transform_matches_naive_fp64(alpha, mode, add_tail, head, path):
    """Gemma 2's softcap and Cohere's scale inside the fused head: values and gradients chained through them
    (logits here reach ±10, so tanh(x/2.5) is far from linear)."""
    x = make_inputs(seed=11)
    want = naive_linear(x, alpha=alpha, tau=0.7, mode=mode, k=K, add_tail=add_tail, **head)
    transform = LogitTransform(**head)
    got = run_linear(x, alpha=alpha, temperature=0.7, mode=mode, top_k=K, add_tail=add_tail,
                     student_head=transform, teacher_head=transform, **PATHS[path])
    assert_matches(got, want)


@pytest.mark.parametrize("head", [LogitTransform(), LogitTransform(scale=0.5, softcap=3.0)], ids=["plain", "capped"])
def test_target_logprobs_is_log_softmax_at_the_targets(head):
    x = make_inputs(seed=12)
    h, w = x["h_s"].detach(), x["w_s"].detach()
    want = torch.log_softmax(head(h @ w.T) / 0.7, -1).gather(-1, x["y"][:, None])[:, 0]
    got = target_logprobs(h, w, x["y"], temperature=0.7, head=head, **CHUNKS)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_fp32 = target_logprobs(h.float(), w.float(), x["y"], temperature=0.7, head=head)
    torch.testing.assert_close(got_fp32.double(), want, rtol=1e-5, atol=1e-5)


def _offset_inputs(offset: float):
    """LLM-like fp32 logits: a shared +offset on every vocabulary entry (as an output layer's mean direction
    gives), teacher close to the student. Returned in fp64 for the reference and fp32 for the test."""
    g = torch.Generator().manual_seed(13)
    n, v, h = 64, 2000, 32
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64)
    w_s = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.6
    h_s[:, 0], w_s[:, 0] = 1.0, offset  # every logit gets +offset: softmax unchanged, fp32 rounding not
    w_t = w_s + 0.05 * torch.randn(v, h, generator=g, dtype=torch.float64)
    w_t[:, 0] = offset
    x = dict(h_s=h_s.requires_grad_(), w_s=w_s.requires_grad_(), h_t=h_s.detach().clone(), w_t=w_t,
             weights=torch.rand(n, generator=g, dtype=torch.float64), y=torch.randint(0, v, (n,), generator=g))
    return x, {k: (t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
               for k, t in x.items()}


def _rel(a, b):
    return float((a.detach().double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
def test_fp32_chunked_is_as_accurate_as_dense_on_offset_logits(alpha):
    """Logits offset by +30 (a softmax invariant) must not cost the chunked path accuracy: a KL taken from
    streamed moments Σ S·s − Σ S·u loses ~1e-7·30 to cancellation (measured 5e-3 to 7e-2 relative error in the
    reverse-KL gradient). The chunked fp32 result stays within a small factor of the dense fp32 path's error."""
    x64, x32 = _offset_inputs(30.0)
    want = naive_linear(x64, alpha=alpha, tau=1.0)
    errors = {}
    for path in ("dense", "streamed", "one-tile"):
        kw = dict(PATHS[path], token_chunk=16, vocab_chunk=300) if path == "streamed" else PATHS[path]
        got = run_linear(x32, alpha=alpha, temperature=1.0, **kw)
        errors[path] = {k: _rel(got[k], want[k]) for k in ("per_token", "entropy", "grad_h", "grad_w")}
    for path in ("streamed", "one-tile"):
        for k, err in errors[path].items():
            assert err < max(4 * errors["dense"][k], 1e-5), (path, k, errors)


def test_fp16_gradients_are_scaled_before_rounding():
    """fp16 under DeepSpeed's dynamic loss scaler: per-token weights of 2.4e-4 (a per-sequence mean over ~250
    tokens, 16 sequences) give gradients below fp16's smallest normal. The scaled gradient must match the fp64
    reference to fp16's precision, with nothing flushed to zero."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    x = make_inputs(seed=14, n=64, v=256)
    x["weights"] = torch.full((64,), 1 / (250 * 16), dtype=torch.float64)
    x16 = {k: (t.detach().half().requires_grad_(t.requires_grad) if t.is_floating_point() and k != "weights"
               else t) for k, t in x.items()}
    want = naive_linear(x16, alpha=0.0, tau=1.0)
    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)  # DeepSpeed's fp16 defaults
    for chunked in (True, False):
        x16["h_s"].grad = x16["w_s"].grad = None
        out = linear_divergence(x16["h_s"], x16["w_s"], x16["h_t"], x16["w_t"], x16["weights"], alpha=0.0,
                                chunked=chunked, **CHUNKS)
        scaler.backward(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in (x16["h_s"], x16["w_s"]))  # no overflow: the scale holds
        for name, param in (("grad_h", x16["h_s"]), ("grad_w", x16["w_s"])):
            grad = param.grad.double() / scaler.cur_scale
            representable = want[name].abs() * scaler.cur_scale > 2.0 ** -14  # fp16's smallest normal, once scaled
            flushed = float(((grad == 0) & representable).double().mean())
            assert flushed == 0.0 and _rel(grad, want[name]) < 2e-3, (chunked, name, flushed, _rel(grad, want[name]))


@pytest.mark.parametrize("alpha,tau,mode,add_tail", GRID)
def test_dense_divergence_matches_naive(alpha, tau, mode, add_tail):
    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).requires_grad_()
    u = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    d = dense_divergence(s, u, alpha=alpha, temperature=tau, mode=mode, top_k=K, add_tail=add_tail, target_ids=y)
    (grad,) = torch.autograd.grad(d.sum(), s)
    s_ref = s.detach().requires_grad_()
    ref = naive_divergence(s_ref, u, alpha=alpha, tau=tau, mode=mode, k=K, add_tail=add_tail, y=y)
    (grad_ref,) = torch.autograd.grad(ref.sum(), s_ref)
    torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_jsd_end_points_are_discontinuous():
    """JSD_α → 0 as α → 0 or 1 while α = 0, 1 are the KLs: documented, intended."""
    g = torch.Generator().manual_seed(2)
    s, u = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    for near, end in [(1e-9, 0.0), (1 - 1e-9, 1.0)]:
        assert dense_divergence(s, u, alpha=near).abs().max() < 1e-7
        assert dense_divergence(s, u, alpha=end).min() > 1e-3


@pytest.mark.parametrize("mode,add_tail", [("full", False), ("topk", True), ("sampled_token", False)])
def test_importance_ratio_clipped_and_absent(mode, add_tail):
    x = make_inputs(seed=3)
    alpha = 1.0 if mode == "sampled_token" else 0.5
    kw = dict(alpha=alpha, mode=mode, add_tail=add_tail)
    for clip in [None, 1.5]:
        want = naive_linear(x, tau=0.7, k=K, rollout=x["rollout"], is_clip=clip, **kw)
        got = run_linear(x, temperature=0.7, top_k=K, rollout_logprobs=x["rollout"], is_clip=clip, **CHUNKS, **kw)
        assert_matches(got, want)
    assert want["ratio"].max() == 1.5 and want["ratio"].min() < 1.5  # the clip binds, but not everywhere
    # absent: no ratio at all (is_clip alone is ignored) -> exactly the unweighted-by-ratio loss
    got = run_linear(x, temperature=0.7, top_k=K, is_clip=1.5, **CHUNKS, **kw)
    assert got["ratio"] is None
    assert torch.equal(got["loss"], (x["weights"] * got["per_token"]).sum())
    assert_matches(got, naive_linear(x, tau=0.7, k=K, **kw))


def test_zero_weights():
    x = make_inputs(seed=4)
    x["weights"] = torch.zeros(N, dtype=torch.float64)
    got = run_linear(x, alpha=0.5, **CHUNKS)
    assert got["loss"] == 0 and not got["grad_h"].any() and not got["grad_w"].any()
    assert (got["per_token"] > 0).all()  # metrics still reported for masked tokens


def test_tied_weights_accumulate():
    """student_weight is also the input embedding: its grad is the sum of both uses."""
    x = make_inputs(seed=5)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (N,), generator=g)
    proj = torch.randn(H_S, H_S, generator=g, dtype=torch.float64)
    w = x["w_s"]

    def grads(fn):
        w.grad = None
        h = torch.tanh(F.embedding(tokens, w) @ proj)
        fn(h).backward()
        return w.grad.clone()

    kw = dict(alpha=0.3, temperature=0.7)
    got = grads(lambda h: linear_divergence(h, w, x["h_t"], x["w_t"], x["weights"], **kw, **CHUNKS).loss)
    want = grads(lambda h: (x["weights"] * naive_divergence(h @ w.T, x["h_t"] @ x["w_t"].T, alpha=0.3, tau=0.7)).sum())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_grad_output_scaling_no_teacher_grad_and_no_grad_mode():
    x = make_inputs(seed=6)
    x["h_t"].requires_grad_()
    out = linear_divergence(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["weights"], alpha=0.5, **CHUNKS)
    (3.0 * out.loss).backward()
    want = naive_linear(x, alpha=0.5, tau=1.0)
    torch.testing.assert_close(x["h_s"].grad, 3 * want["grad_h"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x["w_s"].grad, 3 * want["grad_w"], rtol=1e-10, atol=1e-10)
    assert x["h_t"].grad is None
    with torch.no_grad():
        out = linear_divergence(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["weights"], alpha=0.5, **CHUNKS)
    torch.testing.assert_close(out.per_token, want["per_token"], rtol=1e-10, atol=1e-10)


# bf16 inputs vs the fp64 reference. Contract: matmuls run in the input dtype (bf16 logits, as a bf16
# lm_head gives them; the reference uses the same bf16-GEMM logits), everything after them in fp32;
# the gradient GEMMs take G rounded to bf16 and the grads come back in bf16. Measured relative errors
# (L2) are ≲ 0.5%; 1% still catches a missing 1/τ, a wrong sign or a dropped term (each O(1)).
BF16_RTOL = 1e-2


@pytest.mark.parametrize("alpha,mode,add_tail", [(0.0, "full", False), (0.5, "full", False), (0.5, "topk", True),
                                                 (1.0, "sampled_token", False)])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "dense"])
def test_bf16_close_to_fp64(alpha, mode, add_tail, chunked):
    x = make_inputs(dtype=torch.bfloat16, seed=7)
    # bf16 logits tie often; a tie at the k-th place makes the top-k support ambiguous: leave those out
    top = (x["h_s"] @ x["w_s"].T).detach().topk(K + 1).values
    clear = top[:, K - 1] > top[:, K] if mode == "topk" else torch.ones(N, dtype=torch.bool)
    x["weights"] = x["weights"] * clear
    want = naive_linear(x, alpha=alpha, tau=0.7, mode=mode, k=K, add_tail=add_tail)
    got = run_linear(x, alpha=alpha, temperature=0.7, mode=mode, top_k=K, add_tail=add_tail, chunked=chunked,
                     **CHUNKS)
    assert got["per_token"].dtype == torch.float32 and got["grad_w"].dtype == torch.bfloat16
    got["per_token"], want["per_token"] = got["per_token"][clear], want["per_token"][clear]
    for name in ["loss", "per_token", "entropy", "grad_h", "grad_w"]:
        assert _rel(got[name], want[name]) < BF16_RTOL, (name, _rel(got[name], want[name]))


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op returns (views included, so weights count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("tc,vc", [(64, 128), (32, 4096)], ids=["streamed", "one-tile"])
@pytest.mark.parametrize("alpha,mode,add_tail", [(0.0, "full", False), (0.5, "full", False), (1.0, "full", False),
                                                 (0.5, "topk", True), (1.0, "sampled_token", False)])
def test_chunked_never_materialises_n_by_v(alpha, mode, add_tail, tc, vc):
    """Every op output of the chunked forward+backward is bounded by max(tile, V·H, N·H), far below N·V;
    the dense path (positive control) does produce [N, V] tensors."""
    n, v = 512, 2048
    x = make_inputs(dtype=torch.float32, seed=8, n=n, v=v)
    kw = dict(alpha=alpha, mode=mode, top_k=K, add_tail=add_tail, target_ids=x["y"])
    sizes = {}
    for chunked in [True, False]:
        with _LargestOutput() as probe:
            out = linear_divergence(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["weights"], chunked=chunked,
                                    token_chunk=tc, vocab_chunk=vc, **kw)
            out.loss.backward()
        sizes[chunked] = probe.largest
    assert sizes[True] <= max(tc * min(vc, v), v * H_T, n * H_T, tc * K * H_T) <= n * v // 8, sizes
    assert sizes[False] >= n * v, sizes


def test_validation_errors_name_the_problem():
    x = make_inputs(seed=9)
    args = (x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["weights"])

    def call(*a, **kw):
        return linear_divergence(*a, **{"alpha": 0.5, **kw})

    with pytest.raises(ValueError, match="alpha"):
        call(*args, alpha=1.5)
    with pytest.raises(ValueError, match="unknown mode"):
        call(*args, mode="forward_kl")
    with pytest.raises(ValueError, match="needs alpha=1"):
        call(*args, mode="sampled_token", target_ids=x["y"])
    with pytest.raises(ValueError, match="needs target_ids"):
        call(*args, alpha=1.0, mode="sampled_token")
    with pytest.raises(ValueError, match="top_k"):
        call(*args, mode="topk", top_k=V + 1)
    with pytest.raises(ValueError, match="teacher_weight"):
        call(x["h_s"], x["w_s"], x["h_t"], x["w_t"][:-1], x["weights"])
    with pytest.raises(ValueError, match="student_weight"):
        call(x["h_s"], x["w_s"][:, :-1], x["h_t"], x["w_t"], x["weights"])
    with pytest.raises(ValueError, match="token_weights"):
        call(*args[:4], x["weights"][:-1])
    with pytest.raises(ValueError, match="teacher_hidden"):
        call(x["h_s"], x["w_s"], x["h_t"][:-1], x["w_t"], x["weights"])
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        call(x["h_s"][None], x["w_s"], x["h_t"], x["w_t"], x["weights"])
    with pytest.raises(ValueError, match="rollout_logprobs"):
        call(*args, rollout_logprobs=x["rollout"])
    with pytest.raises(ValueError, match="target_ids"):
        call(*args, target_ids=x["y"][:-1])
    with pytest.raises(ValueError, match="unknown mode"):
        dense_divergence(x["h_s"] @ x["w_s"].T, x["h_t"] @ x["w_t"].T, alpha=0.5, mode="nope")
    assert math.isfinite(call(*args).loss.item())
