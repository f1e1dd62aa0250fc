"""The fused, chunked SoftTriple similarity equals the simple composition (values, gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softtriple.losses import SoftTripleLoss
from softtriple.losses._fused import smoothed_max_similarity
from softtriple.losses.softtriple import center_regularizer, relaxed_class_similarity


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,c,k,d,chunk,gamma", [
    (5, 7, 3, 8, 2, 0.1),      # 7 classes in chunks of 2: a ragged last chunk
    (1, 1, 1, 4, 256, 0.5),
    (16, 33, 10, 16, 8, 0.1),
    (9, 100, 4, 32, 256, 0.05),
    (4, 11, 5, 6, 11, 2.0),
    (8, 9, 3, 8, 4, 0.01),    # small gamma: the per-row max is subtracted, not a fixed shift
])
def test_fused_equals_simple(dtype, tol, b, c, k, d, chunk, gamma):
    g = torch.Generator().manual_seed(b * 1000 + c)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    w = torch.randn(c, k, d, generator=g, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(b, c, generator=g, dtype=dtype)
    fused = smoothed_max_similarity(x, w, gamma, chunk)
    simple = relaxed_class_similarity(x, F.normalize(w, dim=2), gamma)
    gf = torch.autograd.grad(fused, [x, w], upstream)
    gs = torch.autograd.grad(simple, [x, w], upstream)
    torch.testing.assert_close(fused, simple, rtol=tol, atol=tol)
    for a, e in zip(gf, gs, strict=True):
        torch.testing.assert_close(a, e, rtol=tol * 10, atol=tol * 10)


def test_fused_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_, w_: smoothed_max_similarity(F.normalize(x_, dim=1), w_, 0.2, 3), (x, w))


def test_loss_with_fused_path_equals_simple_composition():
    torch.manual_seed(1)
    loss_fn = SoftTripleLoss(37, 16, 10).double()
    loss_fn.chunk = 5
    x = torch.randn(12, 16, dtype=torch.float64)
    y = torch.randint(0, 37, (12,))
    ours = loss_fn(x, y)
    w = F.normalize(loss_fn.centers, dim=2)
    sim = relaxed_class_similarity(F.normalize(x, dim=1), w, loss_fn.gamma)
    logits = loss_fn.la * (sim - loss_fn.margin * F.one_hot(y, 37).double())
    simple = F.cross_entropy(logits, y) + loss_fn.tau * center_regularizer(w)
    assert float(ours) == pytest.approx(float(simple), rel=1e-12)


def test_fused_rejects_zero_gamma():
    with pytest.raises(ValueError, match="gamma > 0"):
        smoothed_max_similarity(torch.randn(2, 3), torch.randn(2, 2, 3), 0.0)


def test_compiled_path_equals_eager():
    """The optional torch.compile path computes the same values and gradients."""
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
    w = torch.randn(9, 4, 8, generator=g).requires_grad_(True)
    upstream = torch.randn(6, 9, generator=g)
    results = []
    for compiled in (False, True):
        out = smoothed_max_similarity(x, w, 0.1, chunk=4, compiled=compiled)
        results.append((out, *torch.autograd.grad(out, [x, w], upstream)))
    for a, e in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c,k", [(1, 2), (5, 3), (7, 10)])
def test_fused_regularizer_equals_simple(c, k):
    from softtriple.losses._fused import center_regularizer_fused
    w = torch.randn(c, k, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(c))
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused, simple = center_regularizer_fused(w1), center_regularizer(F.normalize(w2, dim=2))
    (3.0 * fused).backward()
    (3.0 * simple).backward()
    assert float(fused) == pytest.approx(float(simple), rel=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(center_regularizer_fused, (w.clone().requires_grad_(True),))
