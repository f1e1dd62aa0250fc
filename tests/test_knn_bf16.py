"""The bf16 engine (evaluation/bf16.py): its bound holds on adversarial rows, its neighbours are
the float32 path's (indices and order) on random, clustered, duplicated and near-tied rows, the
fallback takes over where bf16 cannot tell rows apart, and a bound that is too small on purpose
gives wrong neighbours (so the bound is what keeps the answer exact)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from softtriple.evaluation import bf16 as bf16_module
from softtriple.evaluation import knn
from softtriple.evaluation.bf16 import similarity_bound
from softtriple.evaluation.float32 import float32_products

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def _rows(kind: str, n: int = 600, d: int = 64, seed: int = 0) -> np.ndarray:
    """float32 rows of one of the kinds the engine must rank as float32 does."""
    return _rows64(kind, n, d, seed).astype(np.float32)


def _rows64(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((n, d))
    if kind == "clustered":
        return rng.standard_normal((20, d))[rng.integers(0, 20, n)] + \
            0.3 * rng.standard_normal((n, d))
    if kind == "duplicated":
        base = rng.standard_normal((n // 4, d))
        return base[rng.integers(0, n // 4, n)]  # every row about four times, bit for bit
    if kind == "near_tied":  # 12 anchors, each with 49 rows whose similarities to it are
        # 5e-5 apart in independent directions: bf16 (error ~1e-3) cannot order them
        anchors = rng.standard_normal((12, d))
        anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
        rows = [anchors]
        for anchor in anchors:
            other = rng.standard_normal((n // 12 - 1, d))
            other -= (other @ anchor)[:, None] * anchor
            other /= np.linalg.norm(other, axis=1, keepdims=True)
            angles = 0.3 + 1e-4 * rng.permutation(len(other))[:, None]
            rows.append(np.cos(angles) * anchor + np.sin(angles) * other)
        return np.concatenate(rows)
    raise AssertionError(kind)


@pytest.mark.parametrize("device", DEVICES)
def test_the_bound_holds_on_adversarial_rows(device):
    """Rows whose every component lies just below a bf16 rounding midpoint (all conversion
    errors of one sign and nearly 2^-9 relative) and their pairs: |s~ - s32| <= beta."""
    rng = np.random.default_rng(1)
    d = 512
    worst = 0.0
    for trial in range(4):
        # bf16 values with a random 7-bit mantissa, pushed to 0.499 of an ulp above
        exponent = rng.integers(-9, -3, (64, d))
        mantissa = 1 + rng.integers(0, 128, (64, d)) / 128
        sign = np.where(rng.random((64, d)) < 0.5, -1.0, 1.0) if trial % 2 else 1.0
        value = sign * mantissa * 2.0 ** exponent * (1 + 0.499 / 128)
        q = _unit(value).to(device)
        q16 = q.to(torch.bfloat16)
        beta = similarity_bound(q, q16, q, q16)
        with float32_products(q.device):  # the products as the engine runs them
            error = float(((q16 @ q16.T).float() - q @ q.T).abs().max())
        worst = max(worst, error)
        assert error <= beta, (error, beta)
    assert worst > 1e-3  # the rows are adversarial indeed: bf16 is far from float32 on them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicated", "near_tied"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_bf16_neighbours_are_the_float32_paths(kind, k, device):
    x = torch.from_numpy(_rows(kind)).to(device)
    fp32 = knn(x, k, backend="torch")
    ours = knn(x, k, backend="bf16")
    assert torch.equal(ours[1], fp32[1])
    assert torch.equal(ours[0], fp32[0])
    gallery = knn(x[:100], k, x[100:], backend="bf16")
    expected = knn(x[:100], k, x[100:], backend="torch")
    assert torch.equal(gallery[1], expected[1]) and torch.equal(gallery[0], expected[0])


def test_near_ties_are_beyond_bf16_alone():
    """The near-tied rows are a real test: ranked by bf16 similarities alone, their order is
    wrong somewhere; the engine still returns the float32 order (the test above)."""
    x = _unit(_rows("near_tied"))
    x16 = x.to(torch.bfloat16)
    sims16 = (x16 @ x16.T).float().fill_diagonal_(float("-inf"))
    sims32 = (x @ x.T).fill_diagonal_(float("-inf"))
    assert not torch.equal(sims16.topk(5, dim=1).indices, sims32.topk(5, dim=1).indices)


@pytest.mark.parametrize("rows,whole", [(300, False), (1000, True)])
def test_rows_bf16_cannot_tell_apart_take_the_exact_path(monkeypatch, rows, whole):
    """Nearly identical rows: every row is within the band of every other, so each block's
    candidates exceed the fallback share and the float32 path answers, exactly: block by block,
    and the whole search at once when the first two blocks fell back."""
    calls = []
    real = bf16_module.knn_bf16

    def counting(q, k, g, exact, exact_all):
        def exact_counted(*args):
            calls.append("block")
            return exact(*args)

        def all_counted():
            calls.append("all")
            return exact_all()
        return real(q, k, g, exact_counted, all_counted)

    monkeypatch.setattr(importlib.import_module("softtriple.evaluation.knn"), "knn_bf16",
                        counting)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(32) + 1e-4 * rng.standard_normal((rows, 32))).astype(np.float32)
    ours = knn(x, 5, backend="bf16")
    assert calls[-1] == ("all" if whole else "block"), calls
    assert torch.equal(ours[1], knn(x, 5, backend="torch")[1])


def test_a_bound_too_small_gives_wrong_neighbours(monkeypatch):
    """With beta forced to 0 (the bound violated on purpose) near-tied rows come back in the
    wrong order: the bound, not luck, is what makes the engine exact."""
    x = _rows("near_tied")
    assert torch.equal(knn(x, 5, backend="bf16")[1], knn(x, 5, backend="torch")[1])
    monkeypatch.setattr(bf16_module, "strip_rows", lambda n: 16)  # small blocks, small unions
    monkeypatch.setattr(bf16_module, "FALLBACK_SHARE", 1.0)  # and no fallback to hide it
    assert torch.equal(knn(x, 5, backend="bf16")[1], knn(x, 5, backend="torch")[1])
    monkeypatch.setattr(bf16_module, "similarity_bound", lambda *args: 0.0)
    assert not torch.equal(knn(x, 5, backend="bf16")[1], knn(x, 5, backend="torch")[1])


def test_the_band_threshold_in_bf16_is_exact():
    """bf16_at_or_above(t) is the smallest bf16 >= t, so for every bf16 s, s >= t (float32)
    exactly when s >= it: the engine's band compares in bf16 and keeps the float32 band."""
    rng = np.random.default_rng(0)
    t = torch.from_numpy(np.concatenate([
        rng.uniform(-1.5, 1.5, 5000), [0.0, -0.0, 1.0, -1.0, 0.997, -0.997, 0.99609375,
                                       1e-30, -1e-30]]).astype(np.float32))
    up = bf16_module.bf16_at_or_above(t)
    assert up.dtype == torch.bfloat16
    assert (up.float() >= t).all()
    below = torch.nextafter(up, torch.full_like(up, float("-inf")))  # the next bf16 down
    assert (below.float() < t).all()
    s = torch.from_numpy(rng.uniform(-1.5, 1.5, (200, 1))).to(torch.bfloat16)
    assert torch.equal(s >= up[None, :], s.float() >= t[None, :])
    assert bf16_module.bf16_at_or_above(torch.tensor([0.997])).item() == 1.0
