"""ProxyNCA, N-pair, lifted structure, semi-hard triplet and clustering losses against loop
references of their papers' formulas, pytorch-metric-learning where it has the same definition,
gradcheck, and degenerate batches."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from reference_losses import (
    clustering_objective_reference,
    clustering_oracle_reference,
    lifted_reference,
    npair_reference,
    proxy_anchor_reference,
    proxy_nca_reference,
    triplet_semihard_reference,
)
from softtriple.losses import (
    LOSSES,
    ClusteringLoss,
    LiftedStructureLoss,
    NPairLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    TripletLoss,
    build_loss,
    loss_arguments,
)

BATCHES = [  # label compositions: balanced pairs, uneven classes, many singletons
    [0, 0, 1, 1, 2, 2, 3, 3],
    [0, 0, 0, 1, 1, 2, 2, 2, 2, 3],
    [0, 1, 2, 3, 0, 4, 5, 1, 6],
]


def _x(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(loss_fn, x, y, ref_fn):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ours, ref = loss_fn(x1, y), ref_fn(x2)
    ours.backward()
    ref.backward()
    assert float(ours) == pytest.approx(float(ref), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("exclude_positive,scale", [(True, 1.0), (False, 3.0)])
def test_proxy_nca_equals_reference(labels, exclude_positive, scale):
    y = torch.tensor(labels)
    loss_fn = ProxyNCALoss(7, 6, scale=scale, exclude_positive=exclude_positive).double()
    _grads(loss_fn, _x(len(y)), y, lambda x: proxy_nca_reference(
        x, y, loss_fn.proxies.detach(), scale, exclude_positive))


def test_proxy_nca_full_softmax_equals_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    y = torch.tensor(BATCHES[1])
    ours = ProxyNCALoss(5, 6, scale=2.0, exclude_positive=False).double()
    peer = pml.ProxyNCALoss(5, 6, softmax_scale=2.0).double()
    with torch.no_grad():
        peer.proxies.copy_(ours.proxies)
    x = _x(len(y))
    assert float(ours(x, y)) == pytest.approx(float(peer(x, y)), rel=1e-9)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("alpha,margin", [(32.0, 0.1), (4.0, 0.0), (10.0, 0.3)])
def test_proxy_anchor_equals_reference(labels, alpha, margin):
    y = torch.tensor(labels)
    loss_fn = ProxyAnchorLoss(8, 6, alpha=alpha, margin=margin).double()
    x1 = _x(len(y)).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    p2 = loss_fn.proxies.detach().clone().requires_grad_(True)
    ours, ref = loss_fn(x1, y), proxy_anchor_reference(x2, y, p2, alpha, margin)
    ours.backward()
    ref.backward()
    assert float(ours) == pytest.approx(float(ref), rel=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(loss_fn.proxies.grad, p2.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("labels", BATCHES)
def test_proxy_anchor_equals_pytorch_metric_learning(labels):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    y = torch.tensor(labels)
    ours = ProxyAnchorLoss(7, 6).double()
    peer = pml.ProxyAnchorLoss(7, 6, margin=0.1, alpha=32).double()
    with torch.no_grad():
        peer.proxies.copy_(ours.proxies)
    x = _x(len(y), seed=3)
    assert float(ours(x, y)) == pytest.approx(float(peer(x, y)), rel=1e-7)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("l2_reg", [0.0, 0.002, 0.5])
def test_npair_equals_reference(labels, l2_reg):
    y = torch.tensor(labels)
    _grads(NPairLoss(l2_reg), _x(len(y), seed=1), y, lambda x: npair_reference(x, y, l2_reg))


def test_npair_equals_pytorch_metric_learning_without_regularizer():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    for labels in BATCHES:  # the peer's dot product normalizes inside: compare on unit rows
        y, x = torch.tensor(labels), F.normalize(_x(len(labels), seed=2), dim=1)
        assert float(NPairLoss(0.0)(x, y)) == pytest.approx(float(pml.NPairsLoss()(x, y)),
                                                            rel=1e-9)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("margin", [0.0, 1.0, 2.0])
def test_lifted_equals_reference(labels, margin):
    y = torch.tensor(labels)
    _grads(LiftedStructureLoss(margin), _x(len(y), seed=3) * 0.5, y,
           lambda x: lifted_reference(x, y, margin))


def test_lifted_equals_pytorch_metric_learning_on_unit_embeddings():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    for labels in BATCHES:  # the peer normalizes inside: compare on unit rows
        y, x = torch.tensor(labels), F.normalize(_x(len(labels), seed=4), dim=1)
        peer = pml.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0)
        assert float(LiftedStructureLoss(1.0)(x, y)) == pytest.approx(float(peer(x, y)), rel=1e-7)


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("margin", [0.2, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_triplet_semihard_equals_reference(labels, margin, seed):
    y = torch.tensor(labels)
    _grads(TripletLoss(margin), _x(len(y), seed=seed), y,
           lambda x: triplet_semihard_reference(x, y, margin))
    _grads(TripletLoss(margin, mining="hardest"), _x(len(y), seed=seed), y,
           lambda x: triplet_semihard_reference(x, y, margin, hardest=True))


def test_triplet_mining_is_named():
    with pytest.raises(ValueError, match="mining must be one of semihard, hardest; got 'hard'"):
        TripletLoss(mining="hard")
    assert repr(TripletLoss()) == "TripletLoss(margin=0.2, mining=semihard)"


@pytest.mark.parametrize("labels", BATCHES)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 5.0])
def test_clustering_equals_reference_for_its_medoids(labels, gamma):
    y = torch.tensor(labels)
    x = _x(len(y), seed=5).requires_grad_(True)
    loss_fn = ClusteringLoss(gamma)
    dist = torch.cdist(F.normalize(x.detach(), dim=1), F.normalize(x.detach(), dim=1))
    medoids = loss_fn.augmented_medoids(dist.numpy(), y.numpy())
    ref = torch.clamp(clustering_objective_reference(x, y, medoids, gamma)
                      - clustering_oracle_reference(x, y), min=0)
    assert float(loss_fn(x, y)) == pytest.approx(float(ref), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_clustering_inference_is_close_to_the_exhaustive_maximum(seed):
    """Greedy + refinement lower-bounds the exact max over all medoid sets; on a tiny batch it
    should be within a few percent of it."""
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    x = _x(len(y), seed=seed)
    loss_fn = ClusteringLoss(1.0)
    dist = torch.cdist(F.normalize(x, dim=1), F.normalize(x, dim=1))
    ours = clustering_objective_reference(x, y, loss_fn.augmented_medoids(dist.numpy(),
                                                                          y.numpy()), 1.0)
    exact = max(float(clustering_objective_reference(x, y, list(s), 1.0))
                for s in itertools.combinations(range(len(y)), 3))
    assert float(ours) <= exact + 1e-9
    assert float(ours) >= exact - 0.05 * abs(exact)


@pytest.mark.parametrize("make", [
    lambda: ProxyNCALoss(4, 3).double(),
    lambda: ProxyAnchorLoss(4, 3, alpha=4.0).double(),
    lambda: NPairLoss(),
    lambda: LiftedStructureLoss(),
])
def test_gradcheck_smooth_losses(make):
    loss_fn = make()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = _x(6, d=3, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_: loss_fn(x_, y), (x,))


@pytest.mark.parametrize("name", ["npair", "lifted", "triplet", "clustering"])
@pytest.mark.parametrize("labels,reason", [
    ([0, 1, 2, 3], "no positive pair|two or more classes"),
    ([2, 2, 2, 2], "only one class|two or more classes"),
])
def test_degenerate_batches_give_zero_with_one_warning(name, labels, reason):
    loss_fn = build_loss(name)
    x = _x(len(labels)).requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_fn(x, torch.tensor(labels))
    if float(loss) != 0 or len(caught) == 0:  # clustering of distinct labels is exactly 0
        assert name == "clustering" and float(loss) == 0 and len(caught) == 0
    else:
        assert len(caught) == 1 and any(r in str(caught[0].message) for r in reason.split("|"))
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_proxy_losses_with_single_class_batches_are_finite():
    for loss_fn in (ProxyNCALoss(3, 6), ProxyAnchorLoss(3, 6),
                    build_loss("softtriple", num_classes=3, embedding_dim=6)):
        loss = loss_fn(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_runs_forward_and_backward(name):
    needs_classes = {"num_classes", "embedding_dim"} <= set(loss_arguments(name))
    loss_fn = build_loss(name, **({"num_classes": 4, "embedding_dim": 8} if needs_classes else {}))
    x = torch.randn(8, 8, requires_grad=True)
    loss = loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for param in loss_fn.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
