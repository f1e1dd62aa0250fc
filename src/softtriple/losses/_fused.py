"""A fused SoftTriple class similarity with a hand-derived backward, chunked over classes.

The simple composition (normalize the centers, one product, softmax, multiply, sum) makes several
passes over (B, C, K) tensors (and softmax over a last dimension of size K is slow), a normalized
copy of the centers, and autograd keeps every intermediate. Here the centers' normalization is
folded into the product (column scaling by 1 / |w_j|), and the smoothed max and its gradient run
class chunk by class chunk. The step costs the three matrix products it cannot avoid (one
forward, two backward) plus a few element-wise passes.

Gradient (s = x . w / |w|, q = softmax_k(s / gamma), S = sum_k q s):
    dS/ds_k = q_k (1 + (s_k - S) / gamma)
    ds_j/dw_j = x / |w_j| - s_j w_j / |w_j|^2,   ds_j/dx = w_j / |w_j|
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from softtriple.losses._precision import no_autocast, up
from softtriple.losses._triton import triton_smoothed_max_similarity
from softtriple.losses._triton import usable as triton_usable


def _fixed_shift_ok(gamma: float, dtype: torch.dtype) -> bool:
    """Cosines lie in [-1, 1], so exp((s - 1) / gamma) never overflows; it underflows only when
    2 / gamma nears the exponent range, where the per-row max is subtracted instead."""
    return 2.0 / gamma < (600.0 if dtype == torch.float64 else 60.0)


def _forward_chunk(t_raw: Tensor, scale: Tensor, k: int, gamma: float,
                   fixed_shift: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """t = s / gamma (B, c, K), the shift of the exponent (a scalar or (B, c, 1)),
    z = sum_k exp(t - shift) (B, c) and S (B, c). Overwrites t_raw (B, cK) with t."""
    t3 = t_raw.mul_(scale).view(t_raw.shape[0], -1, k)
    shift = t3.amax(dim=2, keepdim=True) if not fixed_shift else t3.new_full((), 1.0 / gamma)
    e3 = torch.sub(t3, shift).exp_()
    z = e3.sum(dim=2)
    return t3, shift, z, torch.linalg.vecdot(e3, t3).div_(z).mul_(gamma)


def _backward_chunk(t3: Tensor, shift: Tensor, z: Tensor, similarity: Tensor, grad: Tensor,
                    inv_norm: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """dL/d(x . w) (B, cK) = gS q_k (1 + t_k - S / gamma) / |w|, with q = exp(t - shift) / z
    (recomputed: one exp is cheaper than keeping a (B, C, K) tensor), and sum_b dL/ds_bj s_bj
    (cK,), the part of w_j's gradient along w_j."""
    g3 = torch.sub(t3, shift).exp_()
    g3.mul_(torch.sub(t3, (similarity / gamma - 1.0)[:, :, None]))
    g3.mul_((grad / z)[:, :, None])
    g = g3.view(t3.shape[0], -1)  # dL/ds
    along = torch.linalg.vecdot(g.T, t3.view_as(g).T).mul_(gamma)
    return g.mul_(inv_norm), along


_compiled: dict[str, Any] = {}


def _elementwise(compiled: bool) -> tuple[Any, Any]:
    """The chunk functions, eager or compiled once per process with torch.compile (inductor)."""
    if not compiled:
        return _forward_chunk, _backward_chunk
    if not _compiled:
        _compiled["forward"] = torch.compile(_forward_chunk, dynamic=False)
        _compiled["backward"] = torch.compile(_backward_chunk, dynamic=False)
    return _compiled["forward"], _compiled["backward"]


class _SmoothedMaxSimilarity(torch.autograd.Function):
    """Forward keeps, per class chunk, t = s / gamma (B, c, K) and the softmax normalizer z;
    backward reuses them, so the step runs the three unavoidable matrix products and no others."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, centers: Tensor, gamma: float,  # type: ignore[override]
                chunk: int, compiled: bool) -> Tensor:
        num_classes, k, d = centers.shape
        w = centers.reshape(num_classes * k, d)  # (CK, d), raw
        inv_norm = 1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12)  # (CK,)
        scale = inv_norm / gamma  # turns x . w into t = s / gamma
        fixed = _fixed_shift_ok(gamma, x.dtype)
        forward_chunk, _ = _elementwise(compiled)
        similarity = x.new_empty(x.shape[0], num_classes)  # (B, C)
        saved = []
        for c0 in range(0, num_classes, chunk):
            c1 = min(c0 + chunk, num_classes)
            t_raw = torch.mm(x, w[c0 * k:c1 * k].T)  # (B, cK): x . w, one product per chunk
            t3, shift, z, sim = forward_chunk(t_raw, scale[c0 * k:c1 * k], k, gamma, fixed)
            similarity[:, c0:c1] = sim
            saved.append((t3, shift, z))
        ctx.save_for_backward(x, centers, inv_norm, similarity)
        ctx.chunks, ctx.gamma, ctx.chunk, ctx.compiled = saved, gamma, chunk, compiled
        return similarity

    @staticmethod
    def backward(ctx: Any,  # type: ignore[override]
                 grad_similarity: Tensor) -> tuple[Tensor | None, ...]:
        x, centers, inv_norm, similarity = ctx.saved_tensors
        gamma, chunk = ctx.gamma, ctx.chunk
        _, backward_chunk = _elementwise(ctx.compiled)
        num_classes, k, d = centers.shape
        w = centers.reshape(num_classes * k, d)
        grad_x = torch.zeros_like(x)
        grad_w = torch.empty_like(w)
        for (t3, shift, z), c0 in zip(ctx.chunks, range(0, num_classes, chunk), strict=True):
            c1 = min(c0 + chunk, num_classes)
            rows = slice(c0 * k, c1 * k)
            g, along = backward_chunk(t3, shift, z, similarity[:, c0:c1],
                                      grad_similarity[:, c0:c1], inv_norm[rows], gamma)
            grad_x.addmm_(g, w[rows])  # (B, d)
            gw = torch.mm(g.T, x, out=grad_w[rows])  # (cK, d): sum_b g_bj x_b / |w_j|
            gw.addcmul_(w[rows], (along * inv_norm[rows] ** 2)[:, None], value=-1)
        return grad_x, grad_w.view_as(centers), None, None, None


def smoothed_max_similarity(x: Tensor, centers: Tensor, gamma: float, chunk: int = 1024,
                            compiled: bool = False) -> Tensor:
    """S_{i,c} = sum_k softmax_k(s_{i,c,k} / gamma) s_{i,c,k}, s = x . w_c^k / |w_c^k|.

    Args:
        x: (B, d) L2-normalized embeddings.
        centers: (C, K, d) raw (unnormalized) centers; normalized inside, in the product.
        gamma: entropy weight, > 0.
        chunk: classes per chunk of the element-wise work.
        compiled: fuse each chunk's element-wise work with torch.compile (inductor; needs a C++
            compiler; the first call in a process compiles for a few seconds).

    On CUDA (with Triton) the work runs in ``_triton.py``'s kernels instead, and ``chunk`` and
    ``compiled`` do not apply.

    Returns:
        (B, C) class similarities; differentiable in x and centers (first order only). Float16
        and bfloat16 inputs are computed in float32, with autocast off (float16's exponent range
        would underflow exp(-2 / gamma) to 0 and turn S into 0 / 0), and give float32.
    """
    if gamma <= 0:
        raise ValueError(f"the fused similarity needs gamma > 0; got {gamma}")
    with no_autocast(x.device):
        x, centers = up(x), up(centers)
        if triton_usable(x):  # CUDA: one product and one kernel each way, no class loop
            return triton_smoothed_max_similarity(x, centers, gamma)
        if x.device.type != "cpu":  # another accelerator: one chunk, no loop of small launches
            chunk = centers.shape[0]
        return _SmoothedMaxSimilarity.apply(x, centers, float(gamma), int(chunk), bool(compiled))


class _CenterRegularizer(torch.autograd.Function):
    """R = sum_c sum_{t<s} sqrt(2 + 1e-5 - 2 cos_ts) / (C K (K-1)) from raw centers (C, K, d),
    with one batched (K x K) product forward and one backward; the centers are never copied
    normalized. d cos_ts / d w_t = (w_s / |w_s| - cos_ts w_t / |w_t|) / |w_t|."""

    @staticmethod
    def forward(ctx: Any, centers: Tensor) -> Tensor:  # type: ignore[override]
        num_classes, k, _ = centers.shape
        inv_norm = 1.0 / torch.linalg.vector_norm(centers, dim=2).clamp_min(1e-12)  # (C, K)
        cos = torch.bmm(centers, centers.transpose(1, 2))  # (C, K, K)
        cos.mul_(inv_norm[:, :, None]).mul_(inv_norm[:, None, :])
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=centers.device), 1)
        dist = torch.sqrt((2.0 + 1e-5 - 2.0 * cos).clamp_min(1e-12))  # (C, K, K)
        scale = 1.0 / (num_classes * k * (k - 1))
        ctx.save_for_backward(centers, inv_norm, cos, dist)
        ctx.scale = scale
        return (dist * upper).sum() * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        centers, inv_norm, cos, dist = ctx.saved_tensors
        k = centers.shape[1]
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=centers.device)
        m = (-grad * ctx.scale / dist) * off_diagonal  # dL/dcos_ts for t != s, symmetric
        p = torch.bmm(m * inv_norm[:, :, None] * inv_norm[:, None, :], centers)  # (C, K, d)
        along = (m * cos).sum(dim=2) * inv_norm**2  # (C, K)
        return p.addcmul_(centers, along[:, :, None], value=-1)


def center_regularizer_fused(centers: Tensor) -> Tensor:
    """The SoftTriple center regularizer (scalar) from raw centers (C, K, d), K >= 2; float16
    and bfloat16 centers are computed in float32."""
    with no_autocast(centers.device):
        return _CenterRegularizer.apply(up(centers))
