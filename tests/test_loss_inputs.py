"""Bad input to any loss gets a one-line ValueError naming the problem."""

from __future__ import annotations

import pytest
import torch

from softtriple.losses import SoftMaxNormLoss, SoftTripleLoss

X = torch.randn(4, 8)
Y = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("loss_cls", [SoftTripleLoss, SoftMaxNormLoss])
@pytest.mark.parametrize("embeddings,labels,message", [
    (X, torch.tensor([0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
    (X, torch.tensor([0, -1, 2, 1]), r"labels must lie in \[0, 3\)"),
    (X, torch.tensor([[0, 1, 2, 1]]), "labels must have shape"),
    (X, torch.tensor([0, 1, 2]), "labels must have shape"),
    (X, torch.tensor([0.0, 1.0, 2.0, 1.0]), r"torch.int64 tensor; got torch.float32"),
    (X, torch.tensor([0, 1, 2, 1], dtype=torch.int32), r"got torch.int32 \(use labels.long"),
    (X, torch.tensor([0, 1, 2, 1], dtype=torch.uint8), r"got torch.uint8"),
    (torch.randn(4, 7), Y, "width 7.*embedding_dim=8"),
    (torch.randn(4, 8, 1), Y, r"shape \(batch, dim\)"),
    (torch.randint(0, 3, (4, 8)), Y, "floating"),
    (torch.tensor([[float("nan")] * 8] * 4), Y, "NaN or inf"),
    (torch.full((4, 8), float("inf")), Y, "NaN or inf"),
    (torch.empty(0, 8), torch.empty(0, dtype=torch.long), "empty batch"),
])
def test_bad_batch(loss_cls, embeddings, labels, message):
    loss_fn = loss_cls(3, 8)
    with pytest.raises(ValueError, match=message) as info:
        loss_fn(embeddings, labels)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"centers_per_class": 0}, "centers_per_class must be an integer >= 1"),
    ({"centers_per_class": 2.5}, "centers_per_class must be an integer >= 1"),
    ({"gamma": -0.1}, "gamma must be a finite number >= 0"),
    ({"la": 0.0}, "la must be a finite number > 0"),
    ({"la": float("nan")}, "la must be a finite number > 0"),
    ({"tau": -1.0}, "tau must be a finite number >= 0"),
    ({"margin": -0.1}, "margin must be a finite number >= 0"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftTripleLoss(3, 8, **kwargs)


@pytest.mark.parametrize("num_classes,dim,message", [
    (0, 8, "num_classes must be an integer >= 2"), (3, 0, "embedding_dim must be an integer >= 1")])
def test_bad_sizes(num_classes, dim, message):
    with pytest.raises(ValueError, match=message):
        SoftTripleLoss(num_classes, dim)


@pytest.mark.parametrize("name,kwargs,message", [
    ("softtriple", {"la": 1e38}, r"la=1e\+38 is too large: it must be below 10000"),
    ("softmax_norm", {"la": 2e4}, "la=20000.0 is too large"),
    ("cosface", {"scale": 1e38}, "scale=1e\\+38 is too large"),
    ("proxy_nca", {"scale": 1e5}, "scale=100000.0 is too large"),
    ("proxy_anchor", {"alpha": 1e9}, "alpha=1000000000.0 is too large"),
    ("multi_similarity", {"beta": 1e6}, "beta=1000000.0 is too large"),
    ("softtriple", {"centers_per_class": 10**7, "embedding_dim": 512},
     r"do not fit in this machine's .* GiB; lower num_classes, centers_per_class"),
    ("cosface", {"margin": 1e9}, "margin is subtracted from a cosine and must be below 1"),
    ("arcface", {"margin": 0.5}, r"0.5 reads as radians: give 28.6 \(degrees\)"),
    ("softmax_norm", {"num_classes": 1}, "num_classes must be an integer >= 2 .with one class"),
    ("hardtriple", {"num_classes": 1}, "num_classes must be an integer >= 2"),
])
def test_arguments_no_loss_can_train_with_are_refused(name, kwargs, message):
    """Values that overflow float32, cannot fit in memory, or can only be a unit mistake."""
    from softtriple.losses import build_loss, loss_arguments
    sized = {"num_classes": 10, "embedding_dim": 8}
    args = {k: v for k, v in sized.items() if k in loss_arguments(name)} | kwargs
    with pytest.raises(ValueError, match=message):
        build_loss(name, **args)


@pytest.mark.parametrize("name", ["npair", "lifted"])
def test_losses_on_raw_embeddings_refuse_an_overflow_instead_of_nan(name):
    from softtriple.losses import build_loss
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="so large that their products overflow float32"):
        build_loss(name)(torch.randn(6, 4) * 1e30, y)


def test_multi_similarity_warns_on_a_batch_it_cannot_learn_from():
    from softtriple.losses import build_loss
    loss = build_loss("multi_similarity")
    with pytest.warns(UserWarning, match="the batch has only one class; the loss is 0"):
        assert float(loss(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))) == 0
    with pytest.warns(UserWarning, match="the batch has no positive pair"):
        loss(torch.randn(4, 4), torch.arange(4))
