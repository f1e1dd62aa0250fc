"""The Triton kernels of ``_triton.py`` (its docstring has the math); importing this module
needs Triton.

A program takes one row b of t_raw (B, CK) and BLOCK_C classes, each class's K values padded to
BLOCK_K lanes: t = t_raw / |w| / gamma, m = max_k t, e = exp(t - m), z = sum_k e,
U = sum_k e t / z = S / gamma.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(t_ptr, scale_ptr, num_classes, stride_t, K: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """This program's row and classes: (row, classes, columns, mask, t, e, z), e = 0 and z = 1
    outside the classes."""
    row = tl.program_id(0).to(tl.int64)  # row * stride may pass 2**31
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col = c[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    inside = c < num_classes
    mask = inside[:, None] & (tl.arange(0, BLOCK_K)[None, :] < K)
    t = tl.load(t_ptr + row * stride_t + col, mask=mask, other=0.0) * \
        tl.load(scale_ptr + col, mask=mask, other=0.0)
    m = tl.where(inside, tl.max(tl.where(mask, t, float("-inf")), axis=1), 0.0)
    e = tl.where(mask, tl.exp(t - m[:, None]), 0.0)
    z = tl.where(inside, tl.sum(e, axis=1), 1.0)
    return row, c, col, mask, t, e, z


@triton.jit
def forward(t_ptr, scale_ptr, u_ptr, num_classes, stride_t, stride_u,
            K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """U (B, C) from t_raw (B, CK) and scale = 1 / (|w| gamma) (CK,)."""
    row, c, _, _, t, e, z = _tile(t_ptr, scale_ptr, num_classes, stride_t, K, BLOCK_C, BLOCK_K)
    tl.store(u_ptr + row * stride_u + c, tl.sum(e * t, axis=1) / z, mask=c < num_classes)


@triton.jit
def backward(t_ptr, scale_ptr, inv_norm_ptr, u_ptr, grad_ptr, g_ptr, num_classes, stride_t,
             stride_u, stride_grad, K: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """G = dL/dt_raw (B, CK) = gS q_k (1 + t_k - U) / |w|, q recomputed as the forward's."""
    row, c, col, mask, t, e, z = _tile(t_ptr, scale_ptr, num_classes, stride_t, K, BLOCK_C,
                                       BLOCK_K)
    inside = c < num_classes
    u = tl.load(u_ptr + row * stride_u + c, mask=inside, other=0.0)  # the forward's U
    grad = tl.load(grad_ptr + row * stride_grad + c, mask=inside, other=0.0)
    inv_norm = tl.load(inv_norm_ptr + col, mask=mask, other=0.0)
    g = e * (1.0 + t - u[:, None]) * (grad / z)[:, None] * inv_norm
    tl.store(g_ptr + row * stride_t + col, g, mask=mask)
