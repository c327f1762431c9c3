"""Student–teacher divergences of SDFT (SPEC §2), dense and fused-chunked.

Per completion token: s = f_S(h_S·W_Sᵀ)/τ, u = f_T(h_T·W_Tᵀ)/τ, S = softmax(s), T = softmax(u), where f is the
model's own transform of its output layer (`LogitTransform`: identity for most models).
The α family: α = 0 is KL(T‖S), α = 1 is KL(S‖T), 0 < α < 1 the generalised JSD
α·KL(T‖M) + (1−α)·KL(S‖M) with M = (1−α)S + αT. JSD_α → 0 as α → 0 or α → 1, so the family is
discontinuous at both end points; that is intended (TRL's convention), not a bug. No τ² factor.

`dense_divergence` works on materialised logits with plain autograd: the oracle for tests.
`linear_divergence` starts from hidden states and output weights. Chunked, it never holds more than
one [token_chunk × vocab_chunk] tile of logits per side: value and gradients are computed in the
forward with streaming log-sum-exps (DIVERGENCE_MATH.md) and autograd only scales the stored
gradients. The vocabulary may also be split over the ranks of a process group; chunks and ranks
are merged by the same associative statistics. `linear_cross_entropy`, the SFT baseline's loss −log S(target), is
fused and chunked on the same tiles.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from sdft_ds.divergence_defaults import MODES, TOKEN_CHUNK, VOCAB_CHUNK  # torch-free: SDFTConfig's defaults too


class LogitTransform(NamedTuple):
    """What an output layer does after x = h·Wᵀ: logits = cap·tanh(scale·x/cap), or scale·x without a cap.
    Gemma 2/3 cap (`final_logit_softcapping`), Cohere scales (`logit_scale`), Granite divides (`logits_scaling`)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        return x if self.softcap is None else torch.tanh(x / self.softcap) * self.softcap

    def slope(self, y: Tensor) -> Tensor:
        """∂logits/∂x from the transformed logits y (softcap only: otherwise the constant `scale`)."""
        return (1 - (y / self.softcap).square()) * self.scale


IDENTITY = LogitTransform()


class DivergenceOutput(NamedTuple):
    """What `linear_divergence` returns; every field but `loss` is detached."""

    loss: Tensor  # scalar Σ_t token_weights[t]·ratio[t]·D[t]; carries grad to the student
    per_token: Tensor  # [N] D[t] (fp32; fp64 for fp64 inputs)
    entropy: Tensor  # [N] entropy of S over the full vocabulary, at temperature τ
    target_logprob: Tensor | None  # [N] log S(target_ids[t]), when target_ids is given
    ratio: Tensor | None  # [N] importance ratio applied, when rollout_logprobs is given


# --------------------------------------------------------------------------------------------
# Pointwise pieces, shared by the dense and the chunked paths. Inputs are normalised log-probs
# over the last dimension (the support).


def _log_mixture(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    return torch.logaddexp(log_s + math.log1p(-alpha), log_t + math.log(alpha))


def _pointwise(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    """Terms d_v of D = Σ_v d_v."""
    if alpha == 0:
        return log_t.exp() * (log_t - log_s)
    if alpha == 1:
        return log_s.exp() * (log_s - log_t)
    log_m = _log_mixture(log_s, log_t, alpha)
    return alpha * log_t.exp() * (log_t - log_m) + (1 - alpha) * log_s.exp() * (log_s - log_m)


def _score(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    """ψ_v = ∂D/∂log S_v holding the other log-probs fixed; then ∂D/∂s_v = ψ_v − S_v·Σψ.
    (Chunked path only, no autograd: in-place ops keep the live tiles few.)"""
    if alpha == 0:
        return log_t.exp().neg_()
    if alpha == 1:
        return (log_s - log_t).add_(1).mul_(log_s.exp())
    return (log_s - _log_mixture(log_s, log_t, alpha)).mul_(log_s.exp()).mul_(1 - alpha)


def _support_logprobs(log_p: Tensor, add_tail: bool) -> Tensor:
    """Top-k log-probs → a distribution over the k (renormalised) or k + 1 buckets (tail = the rest)."""
    log_sum = torch.logsumexp(log_p, -1, keepdim=True)
    if not add_tail:
        return log_p - log_sum
    tail = torch.log(-torch.expm1(log_sum.clamp(max=-1e-7)))
    return torch.cat([log_p, tail], -1)


def _topk_divergence(log_s_k: Tensor, log_t_k: Tensor, alpha: float, add_tail: bool) -> Tensor:
    return _pointwise(_support_logprobs(log_s_k, add_tail), _support_logprobs(log_t_k, add_tail), alpha).sum(-1)


def _sampled_token_divergence(log_s_y: Tensor, log_t_y: Tensor) -> Tensor:
    """REINFORCE surrogate of KL(S‖T) at the sampled token: gradient (log S − log T)·∇log S(y)."""
    return (log_s_y - log_t_y).detach() * log_s_y


# --------------------------------------------------------------------------------------------
# Validation


def _check_mode(alpha: float, mode: str, top_k: int | None, target_ids: Tensor | None, vocab: int | None) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if mode == "topk" and (top_k is None or top_k < 1 or (vocab is not None and top_k > vocab)):
        raise ValueError(f"mode='topk' needs 1 <= top_k <= vocabulary size ({vocab}), got top_k={top_k}")
    if mode == "sampled_token":
        if alpha != 1:
            raise ValueError(f"mode='sampled_token' estimates KL(S‖T) and needs alpha=1, got alpha={alpha}")
        if target_ids is None:
            raise ValueError("mode='sampled_token' needs target_ids (the sampled completion tokens)")


def _check_shape(name: str, t: Tensor | None, shape: tuple) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# --------------------------------------------------------------------------------------------
# Dense reference


def dense_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    mode: str = "full",
    top_k: int | None = None,
    add_tail: bool = False,
    target_ids: Tensor | None = None,
) -> Tensor:
    """Per-token D [...] from full [..., V] logits with plain autograd, in the input dtype (the oracle).

    topk: the support is the student's top-k tokens; both sides' log-probs there use their full
    log-sum-exp, then are renormalised over the k or get a tail bucket. sampled_token: value
    (log S(y) − log T(y))·log S(y), gradient (log S(y) − log T(y))·∇log S(y); needs alpha=1.
    """
    _check_mode(alpha, mode, top_k, target_ids, student_logits.shape[-1])
    _check_shape("teacher_logits", teacher_logits, student_logits.shape)
    _check_shape("target_ids", target_ids, student_logits.shape[:-1])
    log_s = torch.log_softmax(student_logits / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.detach() / temperature, -1)
    if mode == "full":
        return _pointwise(log_s, log_t, alpha).sum(-1)
    if mode == "topk":
        idx = student_logits.detach().topk(top_k, -1).indices
        return _topk_divergence(log_s.gather(-1, idx), log_t.gather(-1, idx), alpha, add_tail)
    y = target_ids.unsqueeze(-1)
    return _sampled_token_divergence(log_s.gather(-1, y), log_t.gather(-1, y)).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Streaming statistics: per-token, mergeable in any order (vocabulary chunks or ranks)


_SOFTMAX_BLOCK = 16_384  # columns per block of _Softmax.of: 8 MB of temporaries for 128 fp32 rows


class _Softmax(NamedTuple):
    """Max m, Σ e^{x−m} and Σ e^{x−m}·(x−m) of logits x: the log-sum-exp and the entropy. The moment is taken about
    the running max, so its terms share a sign and nothing cancels; taken about 0 it is of size |x| ≈ 30 and the
    entropy, a difference of two such numbers, loses ~1e-7·|x| in fp32."""

    m: Tensor  # [n]
    d: Tensor  # [n]
    w: Tensor  # [n]

    @classmethod
    def empty(cls, n: int, like: Tensor) -> _Softmax:
        return cls(like.new_full((n,), -math.inf), like.new_zeros(n), like.new_zeros(n))

    @classmethod
    def of(cls, x: Tensor, moment: bool = True) -> _Softmax:
        m = x.amax(-1)
        d, w = x.new_zeros(len(x)), x.new_zeros(len(x))
        for block in x.split(_SOFTMAX_BLOCK, dim=1):  # temporaries of a block, not of the whole tile
            z = block - m[:, None]
            e = z.exp()
            d += e.sum(-1)
            if moment:
                w += _dot(e, z)
        return cls(m, d, w)

    def merge(self, other: _Softmax) -> _Softmax:
        m = torch.maximum(self.m, other.m)
        ref = torch.where(torch.isinf(m), 0, m)  # two empty sides stay empty instead of NaN

        def moved(side: _Softmax) -> tuple[Tensor, Tensor]:  # (Σ e^{x−m}, Σ e^{x−m}·(x−m)) about the new max
            scale = torch.exp(side.m - ref)
            return side.d * scale, torch.where(side.d > 0, side.w + (side.m - ref) * side.d, 0) * scale

        (d1, w1), (d2, w2) = moved(self), moved(other)
        return _Softmax(m, d1 + d2, w1 + w2)

    def lse(self) -> Tensor:
        return self.m + torch.log(self.d)

    def log_probs(self, x: Tensor, inplace: bool = False) -> Tensor:
        """log softmax of a tile, as (x − m) − log d: x − m is exact near the max, where x − lse would round
        to the ulp of |x| (measured 5× the dense path's gradient error for logits near 30)."""
        x = x.sub_(self.m[:, None]) if inplace else x - self.m[:, None]
        return x.sub_(torch.log(self.d)[:, None])

    def entropy(self) -> Tensor:
        return torch.log(self.d) - self.w / self.d


class _TopK(NamedTuple):
    """The k largest logits seen so far and their global vocabulary ids."""

    values: Tensor  # [n, k]
    ids: Tensor  # [n, k] long

    @classmethod
    def empty(cls, n: int, k: int, like: Tensor) -> _TopK:
        return cls(like.new_full((n, k), -math.inf), torch.zeros(n, k, dtype=torch.long, device=like.device))

    @classmethod
    def of(cls, x: Tensor, k: int, first_id: int) -> _TopK:
        values, idx = x.topk(min(k, x.shape[-1]), -1)
        return cls(values, idx + first_id)

    def merge(self, other: _TopK) -> _TopK:
        values, idx = torch.cat([self.values, other.values], -1).topk(self.values.shape[-1], -1)
        return _TopK(values, torch.cat([self.ids, other.ids], -1).gather(-1, idx))


# --------------------------------------------------------------------------------------------
# The base every divergence uses: projection, chunking, cross-rank merges, gradient accumulation


def _rounded(a: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | float]:
    """(a in a GEMM's dtype, the factor it was multiplied by). fp16 first takes a power of two (exact) that brings
    its peak to 1/4: ∂L/∂s is per-token weight × probability gap, ~1e-7, below fp16's normals (bf16 has fp32's
    range); the fp32 product is divided by it again."""
    if dtype != torch.float16:
        return a.to(dtype), 1.0
    peak = a.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    factor = torch.exp2(-2 - torch.floor(torch.log2(peak)))
    return (a * factor).to(dtype), factor


def _addmm_(acc: Tensor, a: Tensor, b: Tensor, scale: float) -> None:
    """acc += scale·a@b, the product in b's dtype (16-bit GEMMs stay 16-bit), the sum in acc's."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=scale)
    else:
        a, factor = _rounded(a, b.dtype)
        acc.add_((a @ b).to(acc.dtype).div_(factor), alpha=scale)


class _Shard(NamedTuple):
    """This rank's contiguous vocabulary rows [offset, offset + rows) of a `vocab`-row output layer."""

    offset: int
    vocab: int
    group: object  # torch.distributed process group, or None on one device

    @classmethod
    def of(cls, weight: Tensor, group) -> _Shard:
        if group is None:
            return cls(0, weight.shape[0], None)
        sizes = [int(s) for s in _all_gather(torch.tensor([weight.shape[0]], device=weight.device), group)]
        if min(sizes) < 1:
            raise ValueError(f"every rank must own at least one vocabulary row, got slice sizes {sizes}")
        return cls(sum(sizes[: dist.get_rank(group)]), sum(sizes), group)

    def fold(self, stats):
        """Merge per-rank statistics in rank order, so every rank holds the same result."""
        if self.group is None or stats is None:
            return stats
        per_rank = zip(*(_all_gather(t, self.group) for t in stats))
        return functools.reduce(type(stats).merge, (type(stats)(*parts) for parts in per_rank))

    def sum(self, x: Tensor) -> Tensor:
        """Σ over ranks in rank order (bitwise the same on every rank)."""
        return x if self.group is None else torch.stack(_all_gather(x, self.group)).sum(0)


def _all_gather(t: Tensor, group) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


class _Tiles:
    """One token chunk against this rank's vocabulary rows: logit tiles, logits at given ids, and
    accumulation of G = ∂L/∂s into the student's gradients (÷τ and the transform's slope, chained through the
    output layer)."""

    def __init__(self, h_s, w_s, h_t, w_t, grad_h, grad_w, *, heads, temperature, vocab_chunk, shard, dtype):
        self.h_s, self.w_s, self.h_t, self.w_t = h_s, w_s, h_t, w_t
        self.grad_h, self.grad_w = grad_h, grad_w  # views into the accumulators, or None
        self.heads = heads  # (student, teacher) LogitTransform
        self.tau, self.chunk, self.shard, self.dtype = temperature, vocab_chunk, shard, dtype
        self.kept = [None, None]  # student, teacher tile when a single tile covers the slice
        self.slope = None  # ∂s/∂x of the last pass's current student tile, for a softcapped head

    @property
    def wants_grad(self) -> bool:
        return self.grad_h is not None or self.grad_w is not None

    @property
    def gain(self) -> float:
        """The constant factor of ∂s/∂x: 1/τ, times the head's scale unless it is in the softcap's slope."""
        head = self.heads[0]
        return (1.0 if head.softcap is not None else head.scale) / self.tau

    def _logits(self, teacher: bool, c: slice) -> Tensor:
        """A logit tile. When one tile spans the whole slice it is kept for the later passes instead
        of recomputed (Liger's token-only layout: vocab_chunk >= the slice's rows)."""
        h, w = (self.h_t, self.w_t) if teacher else (self.h_s, self.w_s)
        head = self.heads[teacher]
        if self.kept[teacher] is not None:
            return self.kept[teacher]
        if h.dtype == self.dtype and head.softcap is None:  # scale and 1/τ in the GEMM epilogue
            x = torch.addmm(h.new_zeros(()), h, w[c].T, beta=0, alpha=head.scale / self.tau)
        else:  # a 16-bit product rounded once (as a 16-bit lm_head's), then transformed in fp32
            x = head((h @ w[c].T).to(self.dtype)).div_(self.tau)
        if w.shape[0] <= self.chunk:
            self.kept[teacher] = x
        return x

    def tiles(self, teacher: bool, last: bool = False):
        """Yield (local vocabulary slice c, s tile [n, c], u tile or None). On the last pass the
        caller owns the tiles and may overwrite them."""
        for c0 in range(0, self.w_s.shape[0], self.chunk):
            c = slice(c0, c0 + self.chunk)
            s, u = self._logits(False, c), self._logits(True, c) if teacher else None
            if last:
                self.kept = [None, None]
                if self.heads[0].softcap is not None:  # before the caller overwrites s
                    self.slope = self.heads[0].slope(s * self.tau)
            yield c, s, u

    def accumulate(self, c: slice, g: Tensor) -> None:
        if self.slope is not None:
            g = g * self.slope
        if self.grad_h is not None:
            _addmm_(self.grad_h, g, self.w_s[c], self.gain)
        if self.grad_w is not None:
            _addmm_(self.grad_w[c], g.T, self.h_s, self.gain)

    def _rows(self, w: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        local = ids - self.shard.offset
        own = (local >= 0) & (local < w.shape[0])
        local = local.clamp(0, w.shape[0] - 1)
        return w[local], local, own  # [n, k, H], [n, k], [n, k]

    def logits_at(self, teacher: bool, ids: Tensor) -> Tensor:
        """[n, k] logits at global vocabulary ids, from the rows of W (never a full logit row)."""
        h, w = (self.h_t, self.w_t) if teacher else (self.h_s, self.w_s)
        rows, _, own = self._rows(w, ids)
        x = torch.bmm(rows, h[:, :, None])[..., 0].to(self.dtype)
        return self.heads[teacher](self.shard.sum(torch.where(own, x, 0))) / self.tau

    def accumulate_at(self, ids: Tensor, g: Tensor, s: Tensor) -> None:
        """Accumulate G given only at the global ids [n, k], where the student's logits are s (the owning rank
        takes each)."""
        rows, local, own = self._rows(self.w_s, ids)
        if self.heads[0].softcap is not None:
            g = g * self.heads[0].slope(s * self.tau)
        g = torch.where(own, g, 0) * self.gain
        if self.grad_h is not None:
            g16, factor = _rounded(g, rows.dtype)
            self.grad_h.add_(torch.bmm(g16[:, None, :], rows)[:, 0].to(self.grad_h.dtype).div_(factor))
        if self.grad_w is not None:
            token = own.nonzero()[:, 0]
            self.grad_w.index_add_(0, local[own], (g[own][:, None] * self.h_s[token]).to(self.grad_w.dtype))

    def stream(self, teacher: bool, top_k: int | None):
        """Pass 1, merged over ranks: the student's (m, d, entropy moment), the teacher's (m, d) and the student's
        top-k candidates."""
        n = len(self.h_s)
        like = self.h_s.new_empty(0, dtype=self.dtype)
        student = _Softmax.empty(n, like)
        teach = _Softmax.empty(n, like) if teacher else None
        cands = _TopK.empty(n, top_k, like) if top_k else None
        for c, s, u in self.tiles(teacher):
            student = student.merge(_Softmax.of(s))
            if teacher:
                teach = teach.merge(_Softmax.of(u, moment=False))
            if top_k:
                cands = cands.merge(_TopK.of(s, top_k, self.shard.offset + c.start))
        return self.shard.fold(student), self.shard.fold(teach), self.shard.fold(cands)


# --------------------------------------------------------------------------------------------
# One small function per divergence support


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a·b per row, without an [n, c] product tile."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P‖Q) per row as Σ P·log P − Σ P·log Q: two dots of normalised log-probs, so no term is of size |logits|."""
    p = log_p.exp()
    return _dot(p, log_p) - _dot(p, log_q)


def _full_divergence(tiles: _Tiles, student: _Softmax, teacher: _Softmax, alpha: float, w: Tensor) -> Tensor:
    """D over the whole vocabulary, from the tiles' log-probs as the dense path computes them (a KL from
    streamed moments Σ S·s − Σ S·u of size |logits| ≈ 30 loses ~1e-7·|logits| to cancellation in fp32: measured
    up to 7e-2 relative error in the reverse-KL gradient). ∂D/∂s = ψ − S·Σψ needs Σψ before the gradient pass:
    −1 for forward KL, whose value is then summed in the gradient pass; KL + 1 for reverse KL and a sum of its own
    for the JSD, both from one pass more."""
    value = torch.zeros_like(student.m)
    psi_sum = torch.full_like(value, -1.0) if alpha == 0 else torch.zeros_like(value)
    separate = alpha != 0 or not tiles.wants_grad
    if separate:
        for _, s, u in tiles.tiles(teacher=True):
            log_s, log_t = student.log_probs(s), teacher.log_probs(u)
            if alpha in (0, 1):
                value += _kl(log_t, log_s) if alpha == 0 else _kl(log_s, log_t)
            else:
                value += _pointwise(log_s, log_t, alpha).sum(-1)
                psi_sum += _score(log_s, log_t, alpha).sum(-1)
        value = tiles.shard.sum(value)
        psi_sum = value + 1 if alpha == 1 else tiles.shard.sum(psi_sum) if alpha != 0 else psi_sum
    if tiles.wants_grad:
        for c, s, u in tiles.tiles(teacher=True, last=True):
            log_s, log_t = student.log_probs(s, inplace=True), teacher.log_probs(u, inplace=True)
            g = _score(log_s, log_t, alpha)
            if not separate:  # forward KL: g = −T, so KL(T‖S) = −(Σ g·log T − Σ g·log S)
                value -= _dot(g, log_t) - _dot(g, log_s)
            g -= log_s.exp_().mul_(psi_sum[:, None])  # ψ − S·Σψ
            tiles.accumulate(c, g.mul_(w[:, None]))
        if not separate:
            value = tiles.shard.sum(value)
    return value


def _support_divergence(tiles: _Tiles, A: Tensor, B: Tensor | None, ids: Tensor, mode: str,
                        alpha: float, add_tail: bool, w: Tensor) -> Tensor:
    """Top-k or sampled token. D depends on the logits at a few ids and (with a tail, or for the
    sampled token) on A; autograd on these small tensors gives ∂D/∂s at the ids and ∂D/∂A, whose
    share of ∂D/∂s_v is S_v·∂D/∂A (one more pass over the vocabulary)."""
    s_k = tiles.logits_at(False, ids).requires_grad_(tiles.wants_grad)
    u_k = tiles.logits_at(True, ids)
    lse = A.detach().requires_grad_(tiles.wants_grad)
    with torch.enable_grad():
        if mode == "sampled_token":
            value = _sampled_token_divergence(s_k - lse[:, None], u_k - B[:, None])[:, 0]
        elif add_tail:
            value = _topk_divergence(s_k - lse[:, None], u_k - B[:, None], alpha, add_tail)
        else:  # renormalising over the k cancels both log-sum-exps
            value = _topk_divergence(s_k, u_k, alpha, add_tail)
        if not tiles.wants_grad:
            return value
        g_k, g_lse = torch.autograd.grad((w * value).sum(), (s_k, lse), allow_unused=True)
    if g_lse is None:
        tiles.accumulate_at(ids, g_k, s_k.detach())
        return value.detach()
    for c, s, _ in tiles.tiles(teacher=False, last=True):  # both parts in one tile: they nearly cancel at the ids
        g = s.sub_(A[:, None]).exp_().mul_(g_lse[:, None])
        local = ids - (tiles.shard.offset + c.start)
        inside = (local >= 0) & (local < g.shape[1])
        tiles.accumulate(c, g.scatter_add_(1, local.clamp(0, g.shape[1] - 1), torch.where(inside, g_k, 0)))
    return value.detach()


class _Config(NamedTuple):
    alpha: float
    temperature: float
    mode: str
    top_k: int | None
    add_tail: bool
    is_clip: float | None
    token_chunk: int
    vocab_chunk: int
    shard: _Shard
    heads: tuple[LogitTransform, LogitTransform]  # student, teacher


def _importance_ratio(target_logprob: Tensor, rollout_logprobs: Tensor, is_clip: float | None) -> Tensor:
    ratio = torch.exp((target_logprob - rollout_logprobs.to(target_logprob.dtype)).clamp(-20, 20))
    return ratio if is_clip is None else ratio.clamp(max=is_clip)


def _accumulator_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fused_forward(h_s, w_s, h_t, w_t, weights, target, rollout, cfg: _Config, need_h: bool, need_w: bool):
    """Chunked value, metrics and student gradients (fp32 or fp64 accumulators)."""
    dtype = _accumulator_dtype(h_s)
    n = h_s.shape[0]
    grad_h = torch.zeros(h_s.shape, dtype=dtype, device=h_s.device) if need_h else None
    grad_w = torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if need_w else None
    per_token, entropy = h_s.new_empty(n, dtype=dtype), h_s.new_empty(n, dtype=dtype)
    target_logprob = h_s.new_empty(n, dtype=dtype) if target is not None else None
    ratio = h_s.new_empty(n, dtype=dtype) if rollout is not None else None
    weights = weights.to(dtype)
    teacher_lse = cfg.mode != "topk" or cfg.add_tail
    for r0 in range(0, n, cfg.token_chunk):
        r = slice(r0, r0 + cfg.token_chunk)
        tiles = _Tiles(h_s[r], w_s, h_t[r], w_t, None if grad_h is None else grad_h[r], grad_w, heads=cfg.heads,
                       temperature=cfg.temperature, vocab_chunk=cfg.vocab_chunk, shard=cfg.shard, dtype=dtype)
        student, teacher, cands = tiles.stream(teacher_lse, cfg.top_k if cfg.mode == "topk" else None)
        A, B = student.lse(), (teacher.lse() if teacher is not None else None)
        entropy[r] = student.entropy()
        w = weights[r]
        if target is not None:
            target_logprob[r] = tiles.logits_at(False, target[r, None])[:, 0] - A
        if rollout is not None:
            ratio[r] = _importance_ratio(target_logprob[r], rollout[r], cfg.is_clip)
            w = w * ratio[r]
        if cfg.mode == "full":
            per_token[r] = _full_divergence(tiles, student, teacher, cfg.alpha, w)
        else:
            ids = cands.ids if cfg.mode == "topk" else target[r, None]
            per_token[r] = _support_divergence(tiles, A, B, ids, cfg.mode, cfg.alpha, cfg.add_tail, w)
    if grad_h is not None and cfg.shard.group is not None:
        dist.all_reduce(grad_h, group=cfg.shard.group)  # each rank saw only its vocabulary slice
    loss = (weights * per_token if ratio is None else weights * ratio * per_token).sum()
    return (loss, per_token, entropy, target_logprob, ratio), grad_h, grad_w


class _FusedLinearLoss(torch.autograd.Function):
    """Value and gradients in one forward (the loss is a terminal scalar, as in Liger-Kernel's fused
    linear losses); backward only scales the stored gradients by grad_output. `fused_forward(h, w, *rest,
    need_h, need_w)` returns (outputs, grad_h, grad_w): `_fused_forward` or `_fused_cross_entropy`."""

    @staticmethod
    def forward(ctx, h_s, w_s, fused_forward, *rest):
        out, grad_h, grad_w = fused_forward(h_s, w_s, *rest, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.num_rest = len(rest)
        # fp16 gradients stay fp32 until backward has applied grad_output (DeepSpeed's loss scale ÷ accumulation
        # steps): rounded to fp16 first, per-token weights ~1e-4 flush a fifth of grad_W to zero. bf16 has fp32's
        # range, so it is rounded now and the fp32 buffers are freed before the decoder's backward.
        keep = [g if g is None or x.dtype == torch.float16 else g.to(x.dtype) for g, x in ((grad_h, h_s), (grad_w, w_s))]
        ctx.grads, ctx.dtypes = keep, (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(*(t for t in out[1:] if t is not None))
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("a fused linear loss computes its gradients once, in forward; backward ran twice")
        grads, ctx.grads = ctx.grads, None
        # in place: no second [V, H] buffer
        grad_h, grad_w = (None if g is None else g.mul_(grad_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return grad_h, grad_w, None, *[None] * ctx.num_rest


def _dense_linear(h_s, w_s, h_t, w_t, weights, target, rollout, cfg: _Config) -> DivergenceOutput:
    """The reference path: full logits (matmul in the input dtype), `dense_divergence`, plain autograd."""
    dtype = _accumulator_dtype(h_s)
    student_head, teacher_head = cfg.heads
    s = student_head((h_s @ w_s.T).to(dtype))
    with torch.no_grad():
        u = teacher_head((h_t @ w_t.T).to(dtype))
        log_s = torch.log_softmax(s / cfg.temperature, -1)
        entropy = -(log_s.exp() * log_s).sum(-1)
        target_logprob = None if target is None else log_s.gather(-1, target[:, None])[:, 0]
        del log_s
    per_token = dense_divergence(s, u, alpha=cfg.alpha, temperature=cfg.temperature, mode=cfg.mode,
                                 top_k=cfg.top_k, add_tail=cfg.add_tail, target_ids=target)
    weights = weights.to(dtype)
    ratio = None
    if rollout is not None:
        ratio = _importance_ratio(target_logprob, rollout, cfg.is_clip)
        weights = weights * ratio
    return DivergenceOutput((weights * per_token).sum(), per_token.detach(), entropy, target_logprob, ratio)


def target_logprobs(hidden: Tensor, weight: Tensor, target_ids: Tensor, *, temperature: float = 1.0,
                    head: LogitTransform = IDENTITY, token_chunk: int = TOKEN_CHUNK,
                    vocab_chunk: int = VOCAB_CHUNK) -> Tensor:
    """log S(target_ids[t]) [N] for hidden states [N, H] and an output weight [V, H], chunked like
    `linear_divergence`, without autograd (fp32; fp64 for fp64 inputs)."""
    _check_shape("weight", weight, (weight.shape[0], hidden.shape[1]))
    _check_shape("target_ids", target_ids, (hidden.shape[0],))
    dtype = _accumulator_dtype(hidden)
    out = hidden.new_empty(hidden.shape[0], dtype=dtype)
    with torch.no_grad():
        for r0 in range(0, len(hidden), token_chunk):
            r = slice(r0, r0 + token_chunk)
            tiles = _Tiles(hidden[r], weight, None, None, None, None, heads=(head, head), temperature=temperature,
                           vocab_chunk=vocab_chunk, shard=_Shard.of(weight, None), dtype=dtype)
            student, _, _ = tiles.stream(teacher=False, top_k=None)
            out[r] = tiles.logits_at(False, target_ids[r, None])[:, 0] - student.lse()
    return out


def _fused_cross_entropy(h, w, target, weights, head: LogitTransform, token_chunk: int, vocab_chunk: int,
                         need_h: bool, need_w: bool):
    """Chunked −log S(target) per token and its weighted gradients, ∂/∂s = S − onehot(target) (fp32 or fp64)."""
    dtype = _accumulator_dtype(h)
    n = h.shape[0]
    grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
    per_token, entropy = h.new_empty(n, dtype=dtype), h.new_empty(n, dtype=dtype)
    weights = weights.to(dtype)
    for r0 in range(0, n, token_chunk):
        r = slice(r0, r0 + token_chunk)
        tiles = _Tiles(h[r], w, None, None, None if grad_h is None else grad_h[r], grad_w, heads=(head, head),
                       temperature=1.0, vocab_chunk=vocab_chunk, shard=_Shard.of(w, None), dtype=dtype)
        student, _, _ = tiles.stream(teacher=False, top_k=None)
        s_y = tiles.logits_at(False, target[r, None])  # [n, 1]
        per_token[r] = student.lse() - s_y[:, 0]
        entropy[r] = student.entropy()
        if tiles.wants_grad:
            for c, s, _ in tiles.tiles(teacher=False, last=True):
                tiles.accumulate(c, student.log_probs(s, inplace=True).exp_().mul_(weights[r, None]))
            tiles.accumulate_at(target[r, None], -weights[r, None], s_y)
    loss = (weights * per_token).sum()
    return (loss, per_token, entropy, -per_token, None), grad_h, grad_w


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target_ids: Tensor, token_weights: Tensor, *,
                         head: LogitTransform = IDENTITY, chunked: bool = True, token_chunk: int = TOKEN_CHUNK,
                         vocab_chunk: int = VOCAB_CHUNK) -> DivergenceOutput:
    """Σ_t token_weights[t]·(−log S(target_ids[t])) from hidden states [N, H] and an output weight [V, H] (SFT's
    loss), chunked and fused like `linear_divergence` (logits one tile at a time, gradients in the forward), or
    dense with plain autograd. Returned as a DivergenceOutput whose per_token is the cross-entropy, so that metrics
    and sample tables read it as SDFT's divergence; ratio is None."""
    _check_shape("weight", weight, (weight.shape[0], hidden.shape[1]))
    _check_shape("target_ids", target_ids, (hidden.shape[0],))
    _check_shape("token_weights", token_weights, (hidden.shape[0],))
    if not chunked:
        log_s = torch.log_softmax(head((hidden @ weight.T).to(_accumulator_dtype(hidden))), -1)
        per_token = -log_s.gather(-1, target_ids[:, None])[:, 0]
        entropy = -(log_s.exp() * log_s).sum(-1).detach()
        loss = (token_weights.detach().to(per_token.dtype) * per_token).sum()
        return DivergenceOutput(loss, per_token.detach(), entropy, -per_token.detach(), None)
    args = (target_ids, token_weights.detach(), head, token_chunk, vocab_chunk)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return DivergenceOutput(*_fused_cross_entropy(hidden, weight, *args, need_h=False, need_w=False)[0])
    return DivergenceOutput(*_FusedLinearLoss.apply(hidden, weight, _fused_cross_entropy, *args))


def linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    token_weights: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    mode: str = "full",
    top_k: int | None = None,
    add_tail: bool = False,
    target_ids: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    is_clip: float | None = None,
    chunked: bool = True,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    process_group=None,
    student_head: LogitTransform = IDENTITY,
    teacher_head: LogitTransform = IDENTITY,
) -> DivergenceOutput:
    """Σ_t token_weights[t]·ratio[t]·D[t] from hidden states [N, H] and output weights [V, H]; each side's logits
    are its head's `LogitTransform` of h·Wᵀ.

    token_weights [N] carry masks and normalisation (the caller's). With rollout_logprobs [N]
    (log S of target_ids at rollout time), ratio = exp(clamp(log S(y) − rollout, ±20)), clipped
    above at is_clip, detached; otherwise no ratio. Gradients reach the student hidden states and
    weight only. With process_group, every rank passes the same tokens and its own contiguous slice
    of both weights' vocabulary rows (rank order); it gets grad_W for its slice and the full grad_h.

    Chunks: logits live one [token_chunk × vocab_chunk] tile at a time. With vocab_chunk >= the
    (per-rank) vocabulary, a token chunk's tile is kept across the passes: no recomputation, the
    output-layer FLOPs of the dense path. A smaller vocab_chunk bounds memory by the tile instead and
    recomputes tiles (~1.5× the FLOPs for forward KL, 2× for reverse KL and the JSD). The defaults (128 tokens, one
    tile up to 262,144 rows) measured 9% of the dense peak memory at about its time for
    N = 2048, V = 151,936, H = 896 on CPU (benchmarks/divergence.py); GPUs want larger token chunks.
    """
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(f"hidden states must be [N, H], got student {tuple(student_hidden.shape)}, "
                         f"teacher {tuple(teacher_hidden.shape)}")
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    _check_shape("student_weight", student_weight, (vocab, student_hidden.shape[1]))
    _check_shape("teacher_weight", teacher_weight, (vocab, teacher_hidden.shape[1]))
    _check_shape("teacher_hidden", teacher_hidden, (n, teacher_hidden.shape[1]))
    _check_shape("token_weights", token_weights, (n,))
    _check_shape("target_ids", target_ids, (n,))
    _check_shape("rollout_logprobs", rollout_logprobs, (n,))
    if student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise ValueError(f"hidden states and weights must share a dtype per side, got student "
                         f"{student_hidden.dtype}/{student_weight.dtype}, "
                         f"teacher {teacher_hidden.dtype}/{teacher_weight.dtype}")
    if rollout_logprobs is not None and target_ids is None:
        raise ValueError("rollout_logprobs (importance ratio) needs target_ids")
    if temperature <= 0 or token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"temperature, token_chunk and vocab_chunk must be positive, got "
                         f"{temperature}, {token_chunk}, {vocab_chunk}")
    if process_group is not None and not chunked:
        raise ValueError("process_group (vocabulary-parallel) needs chunked=True")
    shard = _Shard.of(student_weight, process_group)
    _check_mode(alpha, mode, top_k, target_ids, shard.vocab)
    cfg = _Config(alpha, temperature, mode, top_k, add_tail, is_clip, token_chunk, vocab_chunk, shard,
                  (student_head, teacher_head))
    args = (student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), token_weights.detach(),
            target_ids, None if rollout_logprobs is None else rollout_logprobs.detach())
    if not chunked:
        return _dense_linear(*args, cfg)
    if not torch.is_grad_enabled() or not (student_hidden.requires_grad or student_weight.requires_grad):
        return DivergenceOutput(*_fused_forward(*args, cfg, need_h=False, need_w=False)[0])  # metrics only
    return DivergenceOutput(*_FusedLinearLoss.apply(args[0], args[1], _fused_forward, *args[2:], cfg))
