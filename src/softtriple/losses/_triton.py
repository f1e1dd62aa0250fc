"""SoftTriple's smoothed max over K as two Triton kernels: the GPU twin of ``_fused.py``.

The CPU path runs the element-wise work class chunk by class chunk, a Python loop that keeps
the chunk in cache; on a GPU that loop is a few hundred small kernel launches. Here the product
t_raw = x . w (B, CK) is one matrix product, and each of forward and backward is one kernel over
it: a program takes one row b and a block of classes, holds each class's K values in registers,
and reads t_raw once. The step costs the three matrix products, two passes over t_raw (one
read forward; one read and one write backward) and O(CK d) for the centers' normalization.

Math (s = t_raw / |w|, t = s / gamma, q = softmax_k(t), U = sum_k q t = S / gamma):
    forward:  U_{b,c} = sum_k exp(t_k - m) t_k / sum_k exp(t_k - m),  m = max_k t_k
    backward: dL/dt_raw_{b,ck} = gS_{b,c} q_k (1 + t_k - U_{b,c}) / |w_ck|     (dS/ds_k as in
              ``_fused.py``), then dL/dx = G w and, with P = G^T x (CK, d), the centers'
              normalization folded in: dL/dw_j = P_j - (w_j . P_j) w_j / |w_j|^2, since
              sum_b dL/ds_bj s_bj = w_j . P_j. No column sum over the batch: no atomics, so the
              kernels are deterministic.

The kernels take only pointers and sizes (no float scalar: Triton would pass gamma as float32
and float64 inputs would lose precision); gamma scales U outside. In a process started with
``TRITON_INTERPRET=1`` they run on CPU tensors in Triton's interpreter: the tests' way to run the
GPU code on a machine without one (training on a CPU takes ``_fused.py``'s path either way).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

BLOCK_ELEMENTS = 2048  # (classes x padded K) values a program holds


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET=1`` when Triton
    is first imported decides it for the whole process (its own library is decorated then)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernels() -> ModuleType | None:
    """The kernels module, or None without Triton."""
    try:
        from softtriple.losses import _triton_kernels
    except ImportError:
        return None
    return _triton_kernels


def usable(x: Tensor) -> bool:
    """Whether the kernels serve x: a CUDA tensor, with Triton installed (it ships with torch's
    CUDA builds) and compiling. CPU tensors take ``_fused.py``'s path."""
    return x.device.type == "cuda" and not interpreting() and _kernels() is not None


def _blocks(num_classes: int, k: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_K): K padded to a power of two, as many classes as fit BLOCK_ELEMENTS."""
    block_k = 1 << (k - 1).bit_length()
    block_c = max(1, min(1 << (num_classes - 1).bit_length(), BLOCK_ELEMENTS // block_k))
    return block_c, block_k


def _checked_kernels(x: Tensor) -> ModuleType:
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the SoftTriple Triton kernels need Triton: pip install triton")
    if (x.device.type == "cpu") != interpreting():
        raise RuntimeError(f"Triton {'interprets' if interpreting() else 'compiles'} kernels in "
                           f"this process (TRITON_INTERPRET at its import), so it cannot run "
                           f"them on {x.device.type} tensors")
    return kernels


class _TritonSmoothedMax(torch.autograd.Function):
    """Saves x, the raw centers, 1 / |w|, t_raw (B, CK) and U (B, C); backward recomputes q."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, centers: Tensor,  # type: ignore[override]
                gamma: float) -> Tensor:
        kernels = _checked_kernels(x)
        num_classes, k, d = centers.shape
        w = centers.reshape(num_classes * k, d)  # (CK, d), raw
        inv_norm = 1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12)  # (CK,)
        scale = inv_norm / gamma  # t = t_raw * scale
        t_raw = torch.mm(x, w.T)  # (B, CK)
        u = x.new_empty(x.shape[0], num_classes)  # (B, C): S / gamma
        block_c, block_k = _blocks(num_classes, k)
        grid = (x.shape[0], -(-num_classes // block_c))
        if x.shape[0]:
            kernels.forward[grid](t_raw, scale, u, num_classes, t_raw.stride(0), u.stride(0),
                                  K=k, BLOCK_C=block_c, BLOCK_K=block_k)
        ctx.save_for_backward(x, centers, inv_norm, scale, t_raw, u)
        ctx.blocks, ctx.grid = (block_c, block_k), grid
        return u * gamma

    @staticmethod
    def backward(ctx: Any,  # type: ignore[override]
                 grad_similarity: Tensor) -> tuple[Tensor | None, ...]:
        x, centers, inv_norm, scale, t_raw, u = ctx.saved_tensors
        kernels = _checked_kernels(x)
        num_classes, k, d = centers.shape
        w = centers.reshape(num_classes * k, d)
        grad = grad_similarity.contiguous()
        g = torch.empty_like(t_raw)  # (B, CK): dL/dt_raw
        block_c, block_k = ctx.blocks
        if x.shape[0]:
            kernels.backward[ctx.grid](t_raw, scale, inv_norm, u, grad, g, num_classes,
                                       t_raw.stride(0), u.stride(0), grad.stride(0), K=k,
                                       BLOCK_C=block_c, BLOCK_K=block_k)
        grad_x = torch.mm(g, w)  # (B, d)
        p = torch.mm(g.T, x)  # (CK, d): sum_b dL/dt_raw_bj x_b
        along = torch.linalg.vecdot(p, w) * inv_norm**2  # (CK,): (w_j . P_j) / |w_j|^2
        grad_w = p.addcmul_(w, along[:, None], value=-1)
        return grad_x, grad_w.view_as(centers), None


def triton_smoothed_max_similarity(x: Tensor, centers: Tensor, gamma: float) -> Tensor:
    """S (B, C) of normalized x (B, d) to raw centers (C, K, d) by the Triton kernels: compiled
    for CUDA tensors, or interpreted for CPU ones under ``TRITON_INTERPRET=1`` (for tests).
    Inputs in one floating dtype (float32 or float64), gamma > 0. Differentiable in x and
    centers (first order)."""
    return _TritonSmoothedMax.apply(x.contiguous(), centers.contiguous(), float(gamma))
