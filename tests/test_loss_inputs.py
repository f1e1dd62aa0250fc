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


@pytest.mark.parametrize("num_classes,dim", [(0, 8), (3, 0)])
def test_bad_sizes(num_classes, dim):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        SoftTripleLoss(num_classes, dim)
