"""Property-based tests (hypothesis): the losses do not depend on the order of the batch, stay
finite for any finite input in their documented ranges, and SoftTriple with K = 1 is SoftMax-norm;
the metrics lie in [0, 1] and the exact kNN equals brute force on inputs full of ties."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softtriple.evaluation import KMeansSettings, evaluate, knn
from softtriple.losses import LOSSES, SoftMaxNormLoss, SoftTripleLoss, build_loss, loss_arguments

CLASSES, DIM = 4, 6


@st.composite
def batches(draw, min_size: int = 2, max_size: int = 12):
    n = draw(st.integers(min_size, max_size))
    labels = draw(st.lists(st.integers(0, CLASSES - 1), min_size=n, max_size=n))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * scale, torch.tensor(labels)


def _loss(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    sized = {"num_classes": CLASSES, "embedding_dim": DIM}
    kwargs = sized if "num_classes" in loss_arguments(name) else {}
    return build_loss(name, **kwargs).double()


PROXY = [n for n in LOSSES if "num_classes" in loss_arguments(n)]


@settings(max_examples=40, deadline=None)
@given(batch=batches(), name=st.sampled_from(PROXY), perm_seed=st.integers(0, 1000))
def test_proxy_losses_ignore_batch_order_and_stay_finite(batch, name, perm_seed):
    x, y = batch
    loss_fn = _loss(name)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(perm_seed))
    a, b = loss_fn(x, y), loss_fn(x[perm], y[perm])
    assert torch.isfinite(a)
    assert float(a) == float(b) or abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))


@settings(max_examples=30, deadline=None)
@given(batch=batches(min_size=4), la=st.floats(0.5, 64.0), margin=st.floats(0.0, 0.5))
def test_softtriple_with_one_center_is_softmax_norm(batch, la, margin):
    x, y = batch
    torch.manual_seed(1)
    one = SoftTripleLoss(CLASSES, DIM, centers_per_class=1, la=la, margin=margin).double()
    torch.manual_seed(1)
    norm = SoftMaxNormLoss(CLASSES, DIM, la=la, margin=margin).double()
    assert float(one(x, y)) == float(norm(x, y))


# unit vectors whose dot products are exact in floating point: +-e_i and (+-1/2, ..., +-1/2)
EXACT = np.array([s * e for e in np.eye(4) for s in (1.0, -1.0)]
                 + [np.array(bits) - 0.5 for bits in np.ndindex(2, 2, 2, 2)])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 40), pool=st.integers(2, len(EXACT)), seed=st.integers(0, 10_000),
       k=st.integers(1, 5))
def test_knn_equals_brute_force_with_ties(n, pool, seed, k):
    rng = np.random.default_rng(seed)
    x = EXACT[rng.integers(0, pool, n)]  # few distinct rows: many exact ties
    k = min(k, n - 1)
    _, index = knn(x, k)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    for i in range(n):
        order = sorted(range(n), key=lambda j: (-sim[i, j], j))[:k]  # ties: lower index first
        assert index[i].tolist() == order


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 60), classes=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_metrics_lie_in_the_unit_interval(n, classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5))
    y = rng.integers(0, classes, n)
    if len(np.unique(y)) < 2:
        y[0], y[1] = 0, 1
    out = evaluate(x, y, ks=(1, 2), metrics=("recall", "precision_at_1", "r_precision",
                                             "map_at_r", "nmi"),
                   kmeans_settings=KMeansSettings(starts=1))
    for key in ("recall@1", "recall@2", "nmi"):
        assert 0.0 <= out[key] <= 1.0 + 1e-12
    for key in ("precision_at_1", "r_precision", "map_at_r"):
        assert np.isnan(out[key]) or 0.0 <= out[key] <= 1.0 + 1e-12
