"""Retrieval metrics against brute-force numpy, pytorch-metric-learning and scikit-learn."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from softtriple.evaluation import (
    evaluate,
    knn,
    map_at_r,
    nmi,
    normalized_mutual_info,
    precision_at_1,
    r_precision,
    recall_at_k,
)
from softtriple.evaluation.metrics import kmeans


def brute_force(q, ql, g=None, gl=None, ks=(1, 2, 4, 8)):
    """Full similarity matrix, stable descending sort (ties: lower index first)."""
    self_search = g is None
    g, gl = (q, ql) if self_search else (g, gl)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = (qn.astype(np.float64) @ gn.T.astype(np.float64))
    out = {f"recall@{k}": 0.0 for k in ks}
    p1, rp, mapr, counted = 0.0, 0.0, 0.0, 0
    for i in range(len(q)):
        order = np.argsort(-sims[i], kind="stable")
        if self_search:
            order = order[order != i]
        rel = gl[order] == ql[i]
        for k in ks:
            out[f"recall@{k}"] += rel[:k].any() / len(q)
        r = int(rel.sum())
        if r == 0:
            continue
        counted += 1
        p1 += rel[0]
        rp += rel[:r].sum() / r
        mapr += sum(rel[:j + 1].sum() / (j + 1) for j in range(r) if rel[j]) / r
    out.update(precision_at_1=p1 / counted, r_precision=rp / counted, map_at_r=mapr / counted)
    return out


def _data(seed, n=60, d=4, classes=7, ties=False):
    rng = np.random.default_rng(seed)
    if ties:  # unit rows of +-0.5: every similarity is exact, so ties are exact in any order
        x = (rng.integers(0, 2, size=(n, 4)) - 0.5).astype(np.float32)
    else:
        x = rng.standard_normal((n, d)).astype(np.float32)
    return x, rng.integers(0, classes, size=n)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_equal_brute_force(seed, ties):
    x, y = _data(seed, ties=ties)
    expected = brute_force(x, y)
    got = evaluate(x, y, metrics=("recall", "precision_at_1", "r_precision", "map_at_r"))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert recall_at_k(x, y)[4] == pytest.approx(expected["recall@4"])
    assert precision_at_1(x, y) == pytest.approx(expected["precision_at_1"])
    assert r_precision(x, y) == pytest.approx(expected["r_precision"])
    assert map_at_r(x, y) == pytest.approx(expected["map_at_r"])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_query_gallery_split_equals_brute_force(seed, ties):
    q, ql = _data(seed, n=25, ties=ties)
    g, gl = _data(seed + 100, n=40, ties=ties)
    expected = brute_force(q, ql, g, gl)
    got = evaluate(q, ql, gallery=g, gallery_labels=gl,
                   metrics=("recall", "precision_at_1", "r_precision", "map_at_r"))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("block", [1, 7, 16, 1000])
@pytest.mark.parametrize("ties", [False, True])
def test_knn_blocks_match_stable_sort(block, ties):
    x, _ = _data(3, n=50, ties=ties)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :9]
    _, index = knn(x, 9, block=block)
    np.testing.assert_array_equal(index.numpy(), expected)
    _, index_g = knn(x[:20], 9, gallery=x, block=block)
    sims_g = xn[:20] @ xn.T
    np.testing.assert_array_equal(index_g.numpy(),
                                  np.argsort(-sims_g, axis=1, kind="stable")[:, :9])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("n", "k", "block"), [(300, 20, 128), (301, 5, 100), (257, 40, 4096)])
def test_knn_chunked_selection_matches_stable_sort(n, k, block, ties):
    """Tiles wide enough for the two-stage (chunk maxima, then candidates) selection, with
    widths that leave a remainder chunk, and many exact ties at the k-th place."""
    from softtriple.evaluation.knn import chunk_size

    assert chunk_size(min(block, n), k) > 1
    x, _ = _data(7, n=n, d=6, ties=ties)
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    _, index = knn(x, k, block=block)
    np.testing.assert_array_equal(index.numpy(), np.argsort(-sims, axis=1, kind="stable")[:, :k])
    _, index_g = knn(x[:50], k, gallery=x, block=block)
    np.testing.assert_array_equal(index_g.numpy(),
                                  np.argsort(-(xn[:50] @ xn.T), axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_knn_dtypes_and_torch_input(dtype):
    x, _ = _data(4, n=40, d=8)
    s_np, i_np = knn(x.astype(dtype), 5)
    _, i_t = knn(torch.from_numpy(x.astype(dtype)), 5)
    np.testing.assert_array_equal(i_np.numpy(), i_t.numpy())
    assert s_np.shape == (40, 5) and bool((s_np[:, :-1] >= s_np[:, 1:]).all())


def test_faiss_product_path_finds_the_same_and_leaves_faiss_as_it_was():
    """Gallery searches ask faiss for its BLAS product (its per-query scan is several times
    slower for a few hundred queries against a large gallery); the setting is faiss-global, so
    it is put back after the search."""
    faiss = pytest.importorskip("faiss")
    from softtriple.evaluation.engines import faiss_search
    x, _ = _data(3, n=600, d=16, classes=20)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    before = faiss.cvar.distance_compute_blas_threshold
    s1, i1 = faiss_search(x[:50], x, 7)
    s2, i2 = faiss_search(x[:50], x, 7, blas=True)
    assert faiss.cvar.distance_compute_blas_threshold == before
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    x, y = _data(5, n=400, d=16, classes=20)
    for gallery in (None, x[100:]):
        s1, i1 = knn(x[:100] if gallery is not None else x, 10, gallery=gallery)
        s2, i2 = knn(x[:100] if gallery is not None else x, 10, gallery=gallery, backend="faiss")
        np.testing.assert_array_equal(i1.numpy(), i2.numpy())
        np.testing.assert_allclose(s1.numpy(), s2.numpy(), atol=1e-5)
    assert evaluate(x, y, backend="faiss", metrics=("recall", "map_at_r")) == \
        evaluate(x, y, metrics=("recall", "map_at_r"))


@pytest.mark.parametrize("seed", range(5))
def test_equals_pytorch_metric_learning_accuracy_calculator(seed):
    ac_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = _data(seed, n=200, d=8, classes=15)
    y[0] = 99  # one lone query, left out by both
    calc = ac_mod.AccuracyCalculator(include=("precision_at_1", "r_precision",
                                              "mean_average_precision_at_r"),
                                     k="max_bin_count", device=torch.device("cpu"))
    # the peer ranks by L2 distance on raw rows: normalized rows rank as cosine similarity does
    xt, yt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1), torch.from_numpy(y)
    peer = calc.get_accuracy(xt, yt)
    ours = evaluate(x, y, metrics=("precision_at_1", "r_precision", "map_at_r"))
    assert ours["precision_at_1"] == pytest.approx(peer["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(peer["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(peer["mean_average_precision_at_r"], abs=1e-6)
    assert ours["lone_queries"] == 1


@pytest.mark.parametrize("seed", range(8))
def test_nmi_equals_sklearn(seed):
    from sklearn.metrics import normalized_mutual_info_score
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 + seed * 3, size=300) + 1000
    b = rng.integers(0, 2 + seed, size=300) * 7
    assert normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info_score(a, b),
                                                         abs=1e-10)
    assert normalized_mutual_info(a, a) == pytest.approx(1.0)


def test_nmi_clusters_separated_data_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 16)) * 10
    y = np.repeat(np.arange(5), 40)
    x = centers[y] + rng.standard_normal((200, 16))
    # k-means from a random start sometimes merges two clusters (NMI about 0.87)
    assert np.mean([nmi(x, y, seed=s) for s in range(6)]) > 0.9
    noise = rng.standard_normal((200, 16))
    assert nmi(noise, y, seed=3) == nmi(noise, y, seed=3)
    assert nmi(noise, y, seed=3) < 0.3


@pytest.mark.parametrize("call,message", [
    (lambda: recall_at_k(np.ones((5, 3)), np.arange(4)), r"labels must have shape \(5,\)"),
    (lambda: recall_at_k(np.ones((5, 3)), np.zeros((5, 1), int)), r"labels must have shape"),
    (lambda: recall_at_k(np.ones((1, 3)), np.arange(1)), "at least two"),
    (lambda: recall_at_k(np.array([[1.0, np.nan], [1, 2]]), np.arange(2)), "1 row.*NaN"),
    (lambda: recall_at_k(np.ones((3, 2)), np.arange(3.0)), "integers"),
    (lambda: recall_at_k(np.ones(3), np.arange(3)), "2-D"),
    (lambda: knn(np.ones((3, 2)), 3), r"k must be in \[1, 2\]"),
    (lambda: evaluate(np.ones((3, 2)), np.arange(3), metrics=("mapr",)), "valid: recall"),
    (lambda: recall_at_k(np.ones((3, 2)), np.arange(3), gallery=np.ones((2, 2))), "together"),
    *[(lambda ks=ks: evaluate(np.eye(4), np.arange(4) % 2, ks=ks),
       "ks must be a non-empty sequence of integers >= 1")
      for ks in [(0,), (-1,), (), (True,), (1.5,), "4", 4, (1, None)]],
    (lambda: recall_at_k(np.eye(4), np.arange(4) % 2, ks=(0, 1)), r"got \(0, 1\)"),
    # k that is no integer, and inputs with nothing to search or cluster
    (lambda: knn(np.ones((3, 2)), True), "k must be an integer; got True"),
    (lambda: knn(np.ones((3, 2)), 1.5), "k must be an integer; got 1.5"),
    (lambda: knn(np.ones((0, 2)), 1), r"the queries are empty \(0 rows\)"),
    (lambda: knn(np.ones((1, 2)), 1), "k=1, but there are 0 other queries"),
    (lambda: knn(np.ones((3, 2)), 2, np.ones((0, 2))), "k=2, but there are 0 items in the"),
    (lambda: kmeans(np.ones((3, 2)), True), "n_clusters must be an integer; got True"),
    (lambda: kmeans(np.ones((0, 2)), 2), "n_clusters=2, but there are 0 embeddings to cluster"),
    (lambda: nmi(np.eye(4), np.arange(4), n_clusters=0), r"n_clusters must be in \[1, 4\]"),
    (lambda: evaluate(np.eye(4), np.arange(4), gallery=np.ones((0, 4)),
                      gallery_labels=np.arange(0)), "the gallery is empty"),
    (lambda: evaluate(np.eye(4), None), "labels is None; give one integer label"),
    (lambda: evaluate(np.eye(4), np.array([None] * 4)), "labels must be integers; got dtype"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_k_larger_than_gallery_is_clipped_with_warning():
    x, y = _data(0, n=5)
    with pytest.warns(UserWarning, match="using k=4"):
        result = recall_at_k(x, y, ks=(1, 8))
    assert result[8] == recall_at_k(x, y, ks=(4,))[4]


def _cub_shaped(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit embeddings with the CUB test shape at 64-d: 5,924 x 64, 100 classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 100, 5924)
    means = rng.standard_normal((100, 64))
    x = means[y] / np.linalg.norm(means[y], axis=1, keepdims=True)
    x = x + 0.25 * rng.standard_normal(x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_default_nmi_is_the_official_protocol_and_faiss_and_torch_agree_within_001():
    """The paper's NMI: sklearn KMeans(n_clusters, init='k-means++', n_init=10), arithmetic NMI.
    Our default is that protocol exactly; the faiss and torch backends implement it too."""
    pytest.importorskip("faiss")
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from softtriple.evaluation import KMeansSettings

    official, default, fast, on_device = [], [], [], []
    for seed in range(2):
        x, y = _cub_shaped(seed)
        clusters = KMeans(100, init="k-means++", n_init=10, random_state=seed).fit_predict(x)
        official.append(normalized_mutual_info_score(y, clusters))
        default.append(nmi(x, y, seed=seed))
        fast.append(nmi(x, y, seed=seed, settings=KMeansSettings(backend="faiss")))
        on_device.append(nmi(x, y, seed=seed, settings=KMeansSettings(backend="torch")))
    assert default == pytest.approx(official, abs=1e-12)
    assert abs(np.mean(fast) - np.mean(official)) < 0.01
    assert abs(np.mean(on_device) - np.mean(official)) < 0.01


def test_torch_kmeans_moves_an_empty_cluster_to_the_farthest_row():
    """Lloyd iterations as scikit-learn's: a center that wins no row (here one placed far from
    every row) moves to the row farthest from its center, and the ten groups are found."""
    from sklearn.metrics import normalized_mutual_info_score

    from softtriple.evaluation.clustering import _lloyd

    g = torch.Generator().manual_seed(0)
    groups = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    y = torch.arange(10).repeat_interleave(30)
    x = groups[y] + 0.01 * torch.randn(300, 16, generator=g)
    centers = torch.cat([x[:270:30], torch.full((1, 16), 100.0)])  # groups 0-8 and a far one
    labels, inertia, _ = _lloyd(x, centers, 300, 1e-12)
    assert normalized_mutual_info_score(y.numpy(), labels.numpy()) == pytest.approx(1.0)
    expected = float(((x - groups[y]) ** 2).sum())  # about each group's true center
    assert inertia == pytest.approx(expected, rel=0.05)


def test_torch_kmeans_is_repeatable_and_takes_every_row_as_its_own_cluster():
    from softtriple.evaluation import KMeansSettings

    x, _ = _cub_shaped(0)
    settings = KMeansSettings(backend="torch", starts=2)
    first = kmeans(x[:600], 40, 3, settings)
    assert first.dtype == np.int64 and first.shape == (600,)
    assert np.array_equal(first, kmeans(x[:600], 40, 3, settings))
    assert len(set(kmeans(x[:50], 50, 0, settings).tolist())) == 50
    random = KMeansSettings(backend="torch", init="random")
    assert "torch random, best of 10 starts" in random.describe()
    assert len(set(kmeans(x[:600], 40, 0, random).tolist())) == 40


def test_default_nmi_is_the_same_without_faiss(monkeypatch):
    x, y = _cub_shaped(3)
    x, y = x[:1500], y[:1500]
    with_faiss = evaluate(x, y, metrics=("nmi",), seed=1)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    without = evaluate(x, y, metrics=("nmi",), seed=1)
    assert with_faiss == without
    assert "k-means++, best of 10 starts" in without["kmeans"]
    from softtriple.evaluation import KMeansSettings
    with pytest.raises(ValueError, match="faiss is not installed"):
        nmi(x, y, settings=KMeansSettings(backend="faiss"))


def test_kmeans_settings_are_checked():
    from softtriple.evaluation import KMeansSettings
    with pytest.raises(ValueError,
                       match="unknown k-means backend 'scipy'; valid: auto, sklearn, faiss"):
        KMeansSettings(backend="scipy")
    with pytest.raises(ValueError, match="starts and iterations must be >= 1"):
        KMeansSettings(starts=0)


def test_all_zero_embeddings_warn_and_rank_alike_in_both_backends():
    x, _y = _data(8, n=80, d=6, classes=8)
    x[[3, 10, 11]] = 0.0
    with pytest.warns(UserWarning, match="3 embedding.s. are all zero"):
        _, index = knn(x, 6)
    assert index[3].tolist() == [0, 1, 2, 4, 5, 6]  # every similarity 0: lowest indices first
    if pytest.importorskip("faiss"):
        with pytest.warns(UserWarning, match="all zero"):
            _, index_faiss = knn(x, 6, backend="faiss")
        assert torch.equal(index, index_faiss)


def test_approximate_indexes_report_their_recall_against_the_exact_search():
    from softtriple.search import EmbeddingIndex
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 16))
    x = (centers[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 16))).astype(
        np.float32)
    labels, paths = np.zeros(4000, dtype=np.int64), [str(i) for i in range(4000)]
    assert EmbeddingIndex(x, labels, paths).recall_against_exact(10, 300) == 1.0
    everything = EmbeddingIndex(x, labels, paths, "ivf", probes=10_000)  # every cell: exact
    assert everything.recall_against_exact(10, 300) == 1.0
    one_cell = EmbeddingIndex(x, labels, paths, "ivf", probes=1)
    assert one_cell.recall_against_exact(10, 300) < 1.0  # approximate, and it says so
    hnsw = EmbeddingIndex(x, labels, paths, "hnsw")
    assert 0.9 <= hnsw.recall_against_exact(10, 300) <= 1.0
    with pytest.raises(ValueError, match="unknown index 'lsh'; valid: flat, ivf, hnsw"):
        EmbeddingIndex(x, labels, paths, "lsh")


@pytest.mark.parametrize("engine", ["torch", "numpy", "faiss", "bf16"])
@pytest.mark.parametrize("ties", [False, True])
def test_knn_equals_stable_sort_with_every_engine(engine, ties, monkeypatch):
    """Tiles by numpy's BLAS or torch's, or faiss's exact search with its tied rows redone: the
    same exact neighbours and tie rule (lower index first), by name and through "auto"."""
    if engine == "faiss":
        pytest.importorskip("faiss")
    knn_module = importlib.import_module("softtriple.evaluation.knn")

    monkeypatch.setenv("SOFTTRIPLE_KNN_ENGINE", engine)
    monkeypatch.setattr(knn_module, "SMALL", 0)  # every search through the engine
    knn_module.cpu_ranking.cache_clear()
    try:
        assert knn_module.cpu_engine() == engine
        x, _ = _data(7, n=301, d=6, ties=ties)
        x = x.astype(np.float32)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = xn @ xn.T
        np.fill_diagonal(sims, -np.inf)
        for backend in ("auto", engine):
            for k in (5, 300):
                _, index = knn(x, k, block=100, backend=backend)
                np.testing.assert_array_equal(
                    index.numpy(), np.argsort(-sims, axis=1, kind="stable")[:, :k])
            _, index_g = knn(x[:50], 9, gallery=x, block=100, backend=backend)
            np.testing.assert_array_equal(
                index_g.numpy(), np.argsort(-(xn[:50] @ xn.T), axis=1, kind="stable")[:, :9])
    finally:
        knn_module.cpu_ranking.cache_clear()


def test_engine_ranking_keeps_torch_on_a_near_tie():
    from softtriple.evaluation.engines import TORCH_MARGIN, rank

    near = 1 - TORCH_MARGIN / 2  # faster than torch, by less than the margin
    assert rank({"faiss": near, "torch": 1.0, "numpy": 2.0})[:2] == ["torch", "faiss"]
    clear = 1 - 2 * TORCH_MARGIN
    assert rank({"faiss": clear, "torch": 1.0, "numpy": 2.0}) == ["faiss", "torch", "numpy"]
    assert rank({"numpy": 0.5, "faiss": 0.7, "torch": 1.0})[:2] == ["numpy", "faiss"]


def test_knn_engine_is_measured_or_named(monkeypatch, tmp_path):
    from softtriple.evaluation import engines
    knn_module = importlib.import_module("softtriple.evaluation.knn")

    monkeypatch.setattr(knn_module, "PROBE", (256, 32, 8))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "softtriple" / "knn_engine.json"
    times = knn_module.measure_engines(repeats=1)
    assert set(times) == set(engines.available()) and all(t > 0 for t in times.values())
    monkeypatch.setenv("SOFTTRIPLE_KNN_ENGINE", "auto")
    knn_module.cpu_ranking.cache_clear()
    try:
        engine = knn_module.cpu_engine()
        assert engine in engines.available()
        cached = json.loads(cache.read_text())
        assert cached["engine"] == engine and cached["machine"] == engines.machine_key()
        other = next(e for e in engines.available() if e != engine)
        cached["seconds"][other] = 0.0  # the cache, not a new measurement, decides the next
        cache.write_text(json.dumps(cached))  # process
        knn_module.cpu_ranking.cache_clear()
        assert knn_module.cpu_engine() == other
        cached["probe"] = [3072, 512, 32]  # another probe's ranking: measured again
        cache.write_text(json.dumps(cached))
        knn_module.cpu_ranking.cache_clear()
        knn_module.cpu_engine()
        assert json.loads(cache.read_text())["probe"] == [256, 32, 8]
        cache.write_text("{not json")
        knn_module.cpu_ranking.cache_clear()
        assert knn_module.cpu_engine() in engines.available()  # a corrupt cache: measured again
        monkeypatch.setenv("SOFTTRIPLE_KNN_ENGINE", "mkl")
        knn_module.cpu_ranking.cache_clear()
        with pytest.raises(ValueError, match="SOFTTRIPLE_KNN_ENGINE='mkl'; valid: auto, torch, "
                                             "numpy, faiss, bf16"):
            knn_module.cpu_engine()
    finally:
        knn_module.cpu_ranking.cache_clear()
    small = torch.randn(40, 8)
    assert knn_module.choose(small, 40) == "torch"  # small searches are not measured
    with pytest.raises(ValueError, match="unknown backend 'blas'; valid: auto, torch, numpy"):
        knn(small, 3, backend="blas")  # type: ignore[arg-type]
