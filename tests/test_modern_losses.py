"""Contrastive, multi-similarity, ArcFace and CosFace (the best methods of Musgrave et al.'s
"A Metric Learning Reality Check") and Sub-center ArcFace against loop references of their
papers' formulas, gradcheck in float64, and pytorch-metric-learning at its defaults and at
other settings."""

from __future__ import annotations

import pytest
import torch

from reference_losses import (
    contrastive_reference,
    margin_softmax_reference,
    multi_similarity_reference,
)
from softtriple.losses import (
    ArcFaceLoss,
    ContrastiveLoss,
    CosFaceLoss,
    MultiSimilarityLoss,
    SubCenterArcFaceLoss,
    build_loss,
)

BATCHES = [  # balanced pairs, uneven classes, singletons beside pairs
    [0, 0, 1, 1, 2, 2, 3, 3],
    [0, 0, 0, 1, 1, 2, 2, 2, 2, 3],
    [0, 1, 2, 3, 0, 4, 5, 1, 6],
]
C, D = 7, 6


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _same(loss_fn, ref_fn, x, y, params=()):
    """Equal value and gradients (embeddings and the loss's parameters) to the reference."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = loss_fn(x1, y), ref_fn(x2)
    assert float(ours) == pytest.approx(float(ref), rel=1e-9, abs=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-10)
    for mine, theirs in params:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize(("pos", "neg"), [(0.0, 1.0), (0.2, 0.8), (0.5, 1.6)])
def test_contrastive_equals_reference(labels, pos, neg):
    y = torch.tensor(labels)
    _same(ContrastiveLoss(pos, neg), lambda x: contrastive_reference(x, y, pos, neg), _x(len(y)), y)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize(("alpha", "beta", "base", "epsilon"),
                         [(2.0, 50.0, 0.5, 0.1), (2.0, 50.0, 0.5, None), (1.0, 10.0, 0.2, 0.3)])
def test_multi_similarity_equals_reference(labels, alpha, beta, base, epsilon):
    y = torch.tensor(labels)
    _same(MultiSimilarityLoss(alpha, beta, base, epsilon),
          lambda x: multi_similarity_reference(x, y, alpha, beta, base, epsilon), _x(len(y), 1), y)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize(("kind", "scale", "margin"),
                         [("cosface", 64.0, 0.35), ("cosface", 10.0, 0.1),
                          ("arcface", 64.0, 28.6), ("arcface", 16.0, 10.0)])
def test_margin_softmax_equals_reference(labels, kind, scale, margin):
    y = torch.tensor(labels)
    loss_fn = build_loss(kind, num_classes=C, embedding_dim=D, scale=scale,
                         margin=margin).double()
    weights = loss_fn.weights.detach().clone().requires_grad_()
    _same(loss_fn, lambda x: margin_softmax_reference(x, y, weights, scale, margin, kind),
          _x(len(y), 2), y, [(loss_fn.weights, weights)])


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize(("centers", "scale", "margin"), [(3, 64.0, 28.6), (2, 16.0, 10.0)])
def test_subcenter_arcface_equals_reference(labels, centers, scale, margin):
    y = torch.tensor(labels)
    loss_fn = SubCenterArcFaceLoss(C, D, scale, margin, centers).double()
    weights = loss_fn.weights.detach().clone().requires_grad_()
    _same(loss_fn, lambda x: margin_softmax_reference(x, y, weights, scale, margin, "arcface",
                                                      centers),
          _x(len(y), 7), y, [(loss_fn.weights, weights)])


def test_subcenter_arcface_with_one_center_is_arcface():
    torch.manual_seed(0)
    ours, arc = SubCenterArcFaceLoss(C, D, centers_per_class=1), ArcFaceLoss(C, D)
    with torch.no_grad():
        arc.weights.copy_(ours.weights)
    x, y = _x(10, 8).float(), torch.tensor(BATCHES[1])
    assert torch.equal(ours(x, y), arc(x, y))


def test_arcface_beyond_pi_minus_m_keeps_decreasing():
    """An embedding opposite its class's weight (theta = pi): the branch cos(theta) - m sin(m),
    with a finite gradient (acos's is infinite there)."""
    loss_fn = ArcFaceLoss(2, 2, scale=1.0, margin=30.0).double()
    with torch.no_grad():
        loss_fn.weights.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = loss_fn(x, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(x.grad).all()
    m = torch.deg2rad(torch.tensor(30.0, dtype=torch.float64))
    expected = torch.logsumexp(torch.stack([-1 - m * torch.sin(m), torch.tensor(0.0)]), 0) - (
        -1 - m * torch.sin(m))
    assert float(loss) == pytest.approx(float(expected))


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity", "arcface", "cosface",
                                  "subcenter_arcface"])
def test_gradcheck_float64(name):
    y = torch.tensor(BATCHES[1])
    proxies = ("arcface", "cosface", "subcenter_arcface")
    sized = {"num_classes": C, "embedding_dim": D} if name in proxies else {}
    small = {"arcface": {"scale": 4.0}, "cosface": {"scale": 4.0},
             "subcenter_arcface": {"scale": 4.0},
             "multi_similarity": {"beta": 5.0}, "contrastive": {"neg_margin": 1.5}}[name]
    loss_fn = build_loss(name, **sized, **small).double()
    x = _x(len(y), 3).requires_grad_()
    params = list(loss_fn.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: loss_fn(x, y), (x, *params))


pml = pytest.importorskip("pytorch_metric_learning.losses")
miners = pytest.importorskip("pytorch_metric_learning.miners")


def _pml_pair(ours, theirs, y, seed, mine=None):
    x = _x(len(y), seed).float()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = ours(x1, y)
    b = theirs(x2, y, mine(x2, y)) if mine else theirs(x2, y)
    assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("margins", [{}, {"pos_margin": 0.1, "neg_margin": 0.9}])
def test_contrastive_equals_pytorch_metric_learning(labels, margins):
    y = torch.tensor(labels)
    _pml_pair(ContrastiveLoss(**margins), pml.ContrastiveLoss(**margins), y, 4)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("settings", [{}, {"alpha": 1.0, "beta": 20.0, "base": 0.3}])
@pytest.mark.parametrize("epsilon", [0.1, 0.3, None])
def test_multi_similarity_equals_pytorch_metric_learning(labels, settings, epsilon):
    """Ours with epsilon equals PML's loss fed by PML's MultiSimilarityMiner(epsilon); with
    epsilon=None, PML's loss alone."""
    y = torch.tensor(labels)
    mine = None if epsilon is None else miners.MultiSimilarityMiner(epsilon=epsilon)
    _pml_pair(MultiSimilarityLoss(**settings, epsilon=epsilon),
              pml.MultiSimilarityLoss(**settings), y, 5, mine)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize(("ours", "theirs", "settings"), [
    (CosFaceLoss, "CosFaceLoss", {}), (CosFaceLoss, "CosFaceLoss", {"scale": 16.0, "margin": 0.2}),
    (ArcFaceLoss, "ArcFaceLoss", {}), (ArcFaceLoss, "ArcFaceLoss", {"scale": 16.0, "margin": 10.0}),
    (SubCenterArcFaceLoss, "SubCenterArcFaceLoss", {}),
    (SubCenterArcFaceLoss, "SubCenterArcFaceLoss",
     {"scale": 16.0, "margin": 10.0, "sub_centers": 5}),
])
def test_margin_softmax_equals_pytorch_metric_learning(labels, ours, theirs, settings):
    """The same weights (PML keeps them as (d, C K), a class's sub-centers side by side): equal
    loss and gradients."""
    y = torch.tensor(labels)
    mine = ours(C, D, **{("centers_per_class" if k == "sub_centers" else k): v
                         for k, v in settings.items()})
    peer = getattr(pml, theirs)(num_classes=C, embedding_size=D, **settings)
    with torch.no_grad():
        peer.W.copy_(mine.weights.T)
    x = _x(len(y), 6).float()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = mine(x1, y), peer(x2, y)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mine.weights.grad, peer.W.grad.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("make", "error"), [
    (lambda: ContrastiveLoss(0.5, 0.5), "neg_margin must be larger than pos_margin"),
    (lambda: ContrastiveLoss(-0.1, 1.0), "pos_margin must be a finite number >= 0"),
    (lambda: MultiSimilarityLoss(base=2.0), r"base must be a number in \[-1, 1\]"),
    (lambda: MultiSimilarityLoss(alpha=0.0), "alpha must be a finite number > 0"),
    (lambda: ArcFaceLoss(3, 4, margin=95.0), "margin is in degrees and must be below 90"),
    (lambda: CosFaceLoss(3, 4, scale=float("inf")), "scale must be a finite number > 0"),
])
def test_bad_settings_are_one_line_errors(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_labels_out_of_range_for_margin_softmax():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        CosFaceLoss(3, 4)(torch.randn(2, 4), torch.tensor([0, 3]))
