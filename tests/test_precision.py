"""Mixed precision: every loss computes in float32 under autocast, its parameters stay float32,
and float16 never underflows the fused SoftTriple path. Runs on the CPU (bf16 autocast), and on
CUDA too where a GPU is present (the device is a parameter)."""

from __future__ import annotations

import pytest
import torch

from softtriple.losses import LOSSES, build_loss, loss_arguments
from softtriple.losses._fused import center_regularizer_fused, smoothed_max_similarity

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
C, D, B = 6, 16, 24


def _loss(name: str, device: str) -> torch.nn.Module:
    params = loss_arguments(name)
    sized = {"num_classes": C, "embedding_dim": D}
    torch.manual_seed(0)
    return build_loss(name, **{k: v for k, v in sized.items() if k in params}).to(device)


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    torch.manual_seed(1)
    features = torch.randn(B, 32, device=device)
    labels = torch.arange(B, device=device) % C  # every class 4 times: pairs for every loss
    head = torch.nn.Linear(32, D).to(device)
    return features, labels, head


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_under_autocast_is_the_float32_loss_of_the_same_embeddings(name, device):
    """Under bf16 autocast, a loss of bf16 embeddings equals the same loss outside autocast on
    those embeddings cast to float32: value and gradients, to float32 rounding."""
    features, labels, head = _batch(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        embeddings = head(features)
    assert embeddings.dtype == torch.bfloat16
    outputs = []
    for autocast in (True, False):
        loss_fn = _loss(name, device)
        x = embeddings.detach().float().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(x, labels)
        assert loss.dtype == torch.float32
        loss.backward()
        outputs.append([loss.detach(), x.grad, *(p.grad for p in loss_fn.parameters())])
    for got, expected in zip(*outputs, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


SELECTING = {  # bf16 rounding changes which examples count: semi-hard triplets, the pairs
    # that still violate a margin (contrastive), the mined pairs (multi-similarity), and the
    # clustering loss's greedy medoids and per-class oracle medoid (argmax / argmin choices):
    # rounding only the fp32 head's output to bf16 changed its medoids in 1 of 40 seeded batches
    # of this shape on the CPU and its gradient by more than 5% of the largest in 2 of 40; on
    # CUDA this file's batch is one of those (gradient off by 1.97 against a 0.098 tolerance).
    # These losses are held to float32 under autocast by the test above instead.
    "triplet", "contrastive", "multi_similarity", "clustering"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(set(LOSSES) - SELECTING))
def test_bf16_autocast_loss_is_float32_and_close_to_fp32(name, device):
    """Under bf16 autocast the head runs in bf16 and the loss in float32: the loss and every
    gradient are finite and equal the float32 run within what bf16's head output allows (its
    8-bit mantissa, about 0.4% per value, grows to about 2% over the head's 32-term products):
    the loss within 5%, every gradient within 5% of the largest one; and the loss's parameters
    stay float32."""
    features, labels, head = _batch(device)
    results = {}
    for precision in ("fp32", "bf16"):
        loss_fn = _loss(name, device)
        head.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            embeddings = head(features)
            loss = loss_fn(embeddings, labels)
        assert loss.dtype == torch.float32
        loss.backward()
        grads = [p.grad.clone() for p in (*head.parameters(), *loss_fn.parameters())]
        assert all(p.dtype == torch.float32 for p in loss_fn.parameters())
        assert all(bool(torch.isfinite(g).all()) for g in grads), precision
        results[precision] = (float(loss), grads)
        if precision == "bf16":
            assert embeddings.dtype == torch.bfloat16  # autocast did run the head in bf16
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=5e-2, abs=1e-3)
    scale = max(float(g.abs().max()) for g in grads32)  # bf16 noise is relative to this
    for g32, g16 in zip(grads32, grads16, strict=True):
        assert float((g32 - g16).abs().max()) <= 5e-2 * scale


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_float16_does_not_underflow(device):
    """exp(-2 / gamma) = e^-20 is below float16's smallest subnormal (6e-8): computed in
    float16, a class whose centers all point away from x would give S = 0 / 0. Half inputs are
    computed in float32 instead, and equal the float32 result."""
    torch.manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(5, D, device=device), dim=1)
    centers = -x[:, None, :].repeat(1, 3, 1)  # every center of class i opposite to x_i
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype).requires_grad_()
        ch = centers.to(dtype).requires_grad_()
        s = smoothed_max_similarity(xh, ch, gamma=0.1)
        assert s.dtype == torch.float32 and bool(torch.isfinite(s).all())
        torch.testing.assert_close(s, smoothed_max_similarity(xh.float(), ch.float(), 0.1))
        (s.sum() + center_regularizer_fused(ch)).backward()
        assert xh.grad is not None and ch.grad is not None
        assert xh.grad.dtype == dtype and bool(torch.isfinite(xh.grad.float()).all())
        assert bool(torch.isfinite(ch.grad.float()).all())


@pytest.mark.parametrize("device", DEVICES)
def test_centers_stay_float32_through_a_bf16_optimizer_step(device):
    loss_fn = _loss("softtriple", device)
    features, labels, head = _batch(device)
    opt = torch.optim.Adam([*head.parameters(), *loss_fn.parameters()], lr=1e-2)
    before = loss_fn.centers.detach().clone()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = loss_fn(head(features), labels)
    loss.backward()
    opt.step()
    assert loss_fn.centers.dtype == torch.float32
    assert not torch.equal(before, loss_fn.centers.detach())
