"""SoftTripleLoss against a loop reference, gradcheck, pytorch-metric-learning, special cases."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from reference_losses import softmax_norm_reference, softtriple_reference
from softtriple.losses import HardTripleLoss, SoftMaxNormLoss, SoftTripleLoss, build_loss


def _batch(b: int, d: int, c: int, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    return x, y


@pytest.mark.parametrize("c,k,b,gamma,tau,margin", [
    (3, 1, 4, 0.1, 0.2, 0.01),
    (5, 3, 7, 0.1, 0.2, 0.01),
    (4, 10, 6, 0.5, 0.0, 0.0),
    (2, 4, 1, 0.05, 1.0, 0.2),
    (6, 2, 9, 1.0, 0.3, 0.05),
    (3, 5, 5, 0.0, 0.2, 0.01),   # HardTriple
])
def test_equals_loop_reference_values_and_gradients(c, k, b, gamma, tau, margin):
    torch.manual_seed(c * 100 + k)
    loss_fn = SoftTripleLoss(c, 8, k, la=20.0, gamma=gamma, tau=tau, margin=margin).double()
    x, y = _batch(b, 8, c, seed=k)
    x.requires_grad_(True)
    ours = loss_fn(x, y)
    gx, gw = torch.autograd.grad(ours, [x, loss_fn.centers])
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = loss_fn.centers.detach().clone().requires_grad_(True)
    ref = softtriple_reference(x_ref, y, w_ref, 20.0, gamma, tau, margin)
    rx, rw = torch.autograd.grad(ref, [x_ref, w_ref])
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gamma,tau", [(0.1, 0.2), (0.5, 0.0), (1.0, 1.0)])
def test_gradcheck(gamma, tau):
    torch.manual_seed(0)
    loss_fn = SoftTripleLoss(3, 5, 3, gamma=gamma, tau=tau, la=5.0).double()
    x, y = _batch(4, 5, 3, seed=1)
    x.requires_grad_(True)
    w = loss_fn.centers.detach().clone().requires_grad_(True)

    def f(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(loss_fn, {"centers": w_}, (x_, y))

    assert torch.autograd.gradcheck(f, (x, w))


def test_equals_pytorch_metric_learning_with_regularizer():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_regs = pytest.importorskip("pytorch_metric_learning.regularizers")
    c, k, d, tau = 7, 4, 16, 0.2
    torch.manual_seed(3)
    ours = SoftTripleLoss(c, d, k, la=20.0, gamma=0.1, tau=tau, margin=0.01).double()
    reg = pml_regs.SparseCentersRegularizer(c, k)
    peer = pml_losses.SoftTripleLoss(c, d, k, la=20.0, gamma=0.1, margin=0.01,
                                     weight_regularizer=reg, weight_reg_weight=tau).double()
    with torch.no_grad():  # PML lays its weight out (d, C*K)
        peer.fc.copy_(ours.centers.reshape(c * k, d).T)
    x, y = _batch(12, d, c, seed=4)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    l_ours, l_peer = ours(x1, y), peer(x2, y)
    l_ours.backward()
    l_peer.backward()
    # PML's regularizer adds finfo.tiny under the square root where the paper's code adds 1e-5;
    # for centers that are not duplicates that moves the loss by under 1e-6.
    assert float(l_ours) == pytest.approx(float(l_peer), abs=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.centers.grad.reshape(c * k, d), peer.fc.grad.T,
                               rtol=1e-5, atol=1e-7)


def test_k1_equals_softmax_norm_and_reference():
    torch.manual_seed(5)
    st = SoftTripleLoss(6, 10, centers_per_class=1).double()
    sm = SoftMaxNormLoss(6, 10).double()
    with torch.no_grad():
        sm.centers.copy_(st.centers[:, 0, :])
    x, y = _batch(9, 10, 6, seed=6)
    assert float(st(x, y)) == pytest.approx(float(sm(x, y)), rel=1e-12)
    ref = softmax_norm_reference(x, y, sm.centers.detach(), 20.0, 0.01)
    assert float(sm(x, y)) == pytest.approx(float(ref), rel=1e-10)


def test_small_gamma_approaches_hardtriple():
    torch.manual_seed(7)
    hard = HardTripleLoss(5, 12, 4).double()
    x, y = _batch(10, 12, 5, seed=8)
    target = float(hard(x, y))
    gaps = []
    for gamma in (0.1, 0.01, 0.001, 1e-4):
        soft = SoftTripleLoss(5, 12, 4, gamma=gamma).double()
        soft.load_state_dict(hard.state_dict())
        gaps.append(abs(float(soft(x, y)) - target))
    assert gaps[-1] < 1e-6
    assert all(a >= b for a, b in itertools.pairwise(gaps))
    assert gaps[0] > 10 * gaps[-1]


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_invariant_to_embedding_scale(scale):
    torch.manual_seed(9)
    loss_fn = SoftTripleLoss(4, 6, 3).double()
    x, y = _batch(8, 6, 4, seed=10)
    assert float(loss_fn(x * scale, y)) == pytest.approx(float(loss_fn(x, y)), rel=1e-12)


def test_centers_shape_and_init():
    loss_fn = SoftTripleLoss(11, 32, 5)
    assert isinstance(loss_fn.centers, torch.nn.Parameter)
    assert loss_fn.centers.shape == (11, 5, 32)
    bound = 1 / 32 ** 0.5  # Kaiming-uniform with a = sqrt(5) on fan_in d
    assert float(loss_fn.centers.abs().max()) <= bound
    assert float(loss_fn.centers.abs().max()) > 0.9 * bound


def test_effective_centers_counts_merged_groups():
    loss_fn = SoftTripleLoss(3, 4, 4, tau=0.2)
    e = torch.eye(4)
    with torch.no_grad():
        loss_fn.centers[0] = e[0]                                   # all four equal: 1
        loss_fn.centers[1] = torch.stack([e[0], e[1], e[2], e[3]])  # all distinct: 4
        # a chain a~b~c (each pair of neighbours close) merges transitively, plus one apart: 2
        loss_fn.centers[2] = torch.stack([e[0], e[0] + 0.3 * e[1], e[0] + 0.6 * e[1], e[3]])
    counts = loss_fn.effective_centers(0.95)
    assert counts.tolist() == [1, 4, 2]
    assert loss_fn.effective_centers(-1.0).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="threshold"):
        loss_fn.effective_centers(1.5)


def test_multiple_centers_beat_one_on_multimodal_classes():
    """Each class is three separated clusters interleaved with other classes' clusters on a circle:
    one center per class cannot cover a class, three can. Only the centers are trained."""
    g = torch.Generator().manual_seed(0)
    num_classes, modes, per_mode, d = 4, 3, 20, 2
    angles, labels = [], []
    for m in range(modes):
        for c in range(num_classes):
            center = 2 * torch.pi * (m * num_classes + c) / (modes * num_classes)
            angles.append(center + 0.05 * torch.randn(per_mode, generator=g))
            labels.append(torch.full((per_mode,), c))
    a, y = torch.cat(angles), torch.cat(labels)
    x = torch.stack([a.cos(), a.sin()], dim=1)

    def accuracy(k: int, seed: int) -> float:
        torch.manual_seed(seed)
        loss_fn = SoftTripleLoss(num_classes, d, k, gamma=0.1, tau=0.0)
        opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            loss_fn(x, y).backward()
            opt.step()
        with torch.no_grad():
            w = F.normalize(loss_fn.centers, dim=2)
            sim = torch.einsum("bd,ckd->bck", x, w).amax(dim=2)
        return float((sim.argmax(dim=1) == y).float().mean())

    # mean over initializations: with gamma = 0.1 a few starts stop in a local optimum
    acc1 = sum(accuracy(1, s) for s in range(4)) / 4
    acc3 = sum(accuracy(3, s) for s in range(4)) / 4
    assert acc1 < 0.4  # one center per class reaches at most one of its three clusters
    assert acc3 > 0.75
    assert acc3 > acc1 + 0.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_forward_backward(dtype):
    loss_fn = SoftTripleLoss(5, 8, 3).to(dtype)
    x, y = _batch(6, 8, 5, seed=11, dtype=dtype)
    x.requires_grad_(True)
    loss = loss_fn(x, y)
    loss.backward()
    assert loss.dtype == dtype and torch.isfinite(loss)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bfloat16_inputs_and_centers_compute_in_float32():
    """Even a module cast to bfloat16 by hand computes its loss in float32 (the inputs and
    centers are cast up inside; the parameter itself keeps the dtype the user gave it)."""
    loss_fn = SoftTripleLoss(5, 8, 3)
    x, y = _batch(6, 8, 5, seed=12, dtype=torch.float32)
    ref = float(loss_fn(x, y))
    low = loss_fn.to(torch.bfloat16)(x.to(torch.bfloat16), y)
    assert low.dtype == torch.float32 and loss_fn.centers.dtype == torch.bfloat16
    assert float(low) == pytest.approx(ref, rel=0.02)


def test_build_loss_registry():
    assert isinstance(build_loss("softtriple", num_classes=3, embedding_dim=4), SoftTripleLoss)
    with pytest.raises(ValueError, match="valid: .*softtriple"):
        build_loss("softriple", num_classes=3, embedding_dim=4)
    with pytest.raises(ValueError, match="unknown argument.*centres.*valid: .*centers_per_class"):
        build_loss("softtriple", num_classes=3, embedding_dim=4, centres=3)


def test_centers_from_the_data_are_each_class_k_means_centroids():
    """init_centers_from: K = 3 well-separated modes per class give 3 centers on the modes; a
    class with fewer examples than K keeps them and fills the rest near them."""
    g = torch.Generator().manual_seed(0)
    modes = torch.nn.functional.normalize(torch.randn(2, 3, 16, generator=g), dim=2)
    x = (modes[:, :, None, :] + 0.01 * torch.randn(2, 3, 20, 16, generator=g)).reshape(-1, 16)
    y = torch.arange(2).repeat_interleave(60)
    few = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=1)
    loss = SoftTripleLoss(3, 16, centers_per_class=3)
    loss.init_centers_from(torch.cat([x, few]), torch.cat([y, torch.tensor([2, 2])]))
    centers = torch.nn.functional.normalize(loss.centers.detach(), dim=2)
    for c in range(2):
        best = (centers[c] @ modes[c].T).max(dim=0).values  # each mode has a center on it
        assert bool((best > 0.99).all()), best
    assert bool(((centers[2] @ few.T).max(dim=1).values > 0.99).all())  # kept, then filled near
    assert loss.effective_centers(0.9999).tolist()[:2] == [3, 3]
    with pytest.raises(ValueError, match=r"needs \(N, 16\) embeddings"):
        loss.init_centers_from(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
