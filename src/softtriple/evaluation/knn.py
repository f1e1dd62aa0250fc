"""Exact k-nearest-neighbour search by cosine similarity, in tiles, never an N x N matrix.

Similarity is the dot product of L2-normalized rows (cosine similarity); inputs are normalized
here, so raw embeddings are fine. Ties are broken deterministically: among equal similarities the
lower gallery index ranks first (the order of a stable descending sort), in both the selection
and the ordering of the k neighbours, by every backend: torch's or numpy's BLAS for the tiles
below, or faiss's exact search, whose rows with a tie at the k-th place are redone here.
``backend="auto"`` (the default) takes the fastest on this machine (``evaluation.engines``).

The search runs on the inputs' device (CPU or CUDA) and copies nothing to the host until the end,
its products in float32 whatever reduced precision its caller runs in (autocast, TF32:
``evaluation.float32``).
Each (block x block) tile of similarities yields the exact top-k set of each of its rows in two
stages: the maximum of each chunk of ``s`` columns, the k chunks with the largest maxima (every
top-k value lies in one of them), and a top-k among those k x s candidates; rows where a tie at
the k-th place makes either stage's pick ambiguous are redone exactly. Each row's candidates from
all tiles are then reduced to its k neighbours.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from softtriple.evaluation.bf16 import knn_bf16
from softtriple.evaluation.engines import (
    ENGINES,
    Engine,
    available,
    faiss_search,
    measured_ranking,
    tile_product,
)
from softtriple.evaluation.float32 import float32_products
from softtriple.evaluation.topk import select_topk

ArrayLike = Tensor | np.ndarray
Backend = Literal["auto", "torch", "numpy", "faiss", "bf16"]
Product = Callable[[Tensor, Tensor], Tensor]
PENDING = 8  # candidates kept per row, in multiples of k, before they are reduced to k
PROBE = (6144, 512, 60)  # rows, width and k of the engines' measurement: about CUB's test set
# (5,924 x 512, k 59). Smaller probes ranked the engines otherwise than the searches users run,
# both ways: 768-2,048 rows took torch on an Intel Xeon where faiss was fastest at 5,924, and
# 3,072 took faiss on an AMD EPYC where torch was (benchmarks/results/knn_engines.json)
SMALL = 2**28  # multiply-adds below which a search goes to torch unmeasured (about 10 ms)
CPU_BLOCK = 4096  # rows per tile on a CPU: a 64 MiB float32 tile, within its caches' reach
# a tile and its temporaries (chunk maxima, candidates, the float32 tile of a half-precision
# product) in multiples of the tile's own bytes, for sizing the tiles of an accelerator
TILE_COPIES = 3
ACCELERATOR_BLOCKS = (4096, 65536)  # the smallest and largest tile an accelerator gets


def as_numpy(values: ArrayLike | Sequence[Any]) -> np.ndarray:
    """Host (numpy) array of labels or values given as a numpy array, a sequence, or a torch
    tensor on any device (a CUDA tensor is copied to the host; ``np.asarray`` would raise)."""
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def as_tensor(array: ArrayLike, name: str) -> Tensor:
    """Torch view of a numpy or torch array of floats, (N, d); float16 is widened to float32."""
    tensor = torch.as_tensor(array)
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float array (N, d); got shape "
                         f"{tuple(tensor.shape)} and dtype {tensor.dtype}")
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    # the extremes are finite iff every value is (min and max propagate NaN): one pass without
    # a (N, d) mask, 16x faster than isfinite().all() on a CPU thread (12.8 M values: 7 ms)
    if tensor.numel() and not all(map(math.isfinite, map(float, torch.aminmax(tensor)))):
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN or inf; drop or fix them first")
    return tensor


def check_k(k: object, available: int, name: str = "k",
            what: str = "items in the gallery") -> int:
    """``k`` as an int in [1, available], or a one-line ValueError: not an integer (True and
    1.5 are not), out of range, or nothing to choose from (``available`` < 1 ``what``)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"{name} must be an integer; got {k!r}")
    if available < 1:
        raise ValueError(f"{name}={k}, but there are 0 {what}; give more embeddings")
    if not 1 <= k <= available:
        raise ValueError(f"{name} must be in [1, {available}] ({available} {what}); got {k}")
    return int(k)


def chunk_size(m: int, k: int) -> int:
    """Columns per chunk for a tile of width m: about sqrt(m / k), which balances the chunk
    maxima (m / s per row) against the candidates (k x s per row); 1 means no chunking."""
    s = max(1, round(math.sqrt(m / k)))
    return s if m // s > k + 1 else 1


def top_k_of_k_plus_one(values: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest of each row of a (b, w) tensor, w > k, in no particular order.

    Returns:
        values (b, k), their columns (b, k), and (b,) bool: the k-th and (k+1)-th largest tie,
        so that which of the tied made the cut is arbitrary.
    """
    vals, pos = values.topk(k + 1, dim=1, sorted=False)
    last = vals.argmin(dim=1, keepdim=True)  # where the (k+1)-th largest is
    ambiguous = (vals == vals.gather(1, last)).sum(dim=1) > 1
    keep = torch.ones_like(vals, dtype=torch.bool).scatter_(1, last, False)
    return vals[keep].view(-1, k), pos[keep].view(-1, k), ambiguous


def tile_topk(tile: Tensor, offset: int, k: int, query_dim: int = 0) -> tuple[Tensor, Tensor]:
    """The exact top-k set of each query of a tile whose gallery indices are offset..offset+m-1.

    Chunk c of a query's m similarities is the strided set of columns {c, c + g, c + 2g, ...}
    (g = m // s chunks of s): its maxima are an elementwise max of s contiguous slabs of the
    tile, fast in either orientation, so one tile serves its rows and its columns without a
    transposed copy.

    Args:
        tile: (b, m) with the queries along ``query_dim`` = 0, or (m, b) with ``query_dim`` = 1.

    Returns:
        (b, min(k, m)) similarities and gallery indices, in no particular order.
    """
    rows = tile if query_dim == 0 else tile.T  # (b, m), a view
    b, m = rows.shape
    device = tile.device
    if m <= k:
        return rows, torch.arange(offset, offset + m, device=device).expand(b, m)
    s = chunk_size(m, k)
    if s == 1:
        sims, column, ambiguous = top_k_of_k_plus_one(rows, k)
    else:  # g strided chunks of s columns, and the last m - s g columns always candidates
        g = m // s
        if query_dim == 0:
            maxima = tile[:, :s * g].view(b, s, g).amax(dim=1)  # (b, g)
        else:
            maxima = tile[:s * g].view(s, g, b).amax(dim=0).T  # (b, g)
        _, chosen, chunk_tie = top_k_of_k_plus_one(maxima, k)  # (b, k)
        columns = (chosen[:, :, None] + g * torch.arange(s, device=device)).view(b, k * s)
        if s * g < m:
            columns = torch.cat([columns, torch.arange(s * g, m, device=device)
                                 .expand(b, m - s * g)], dim=1)
        sims, pick, ambiguous = top_k_of_k_plus_one(rows.gather(1, columns), k)
        column = columns.gather(1, pick)
        ambiguous |= chunk_tie  # a tied chunk left out may hold a value tied with the k-th
    redo = ambiguous.nonzero()[:, 0]
    if len(redo):  # redo exactly: among equals the lower column wins
        sims[redo], column[redo] = select_topk(rows[redo], torch.arange(m, device=device), k)
    return sims, column + offset


class _RunningTopk:
    """Each row's candidates from the tiles seen so far, reduced to the best k now and then."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.sims: list[Tensor] = []
        self.index: list[Tensor] = []

    def add(self, found: tuple[Tensor, Tensor]) -> None:
        self.sims.append(found[0])
        self.index.append(found[1])
        if sum(part.shape[1] for part in self.sims) >= PENDING * self.k:
            sims, index = self.best()
            self.sims, self.index = [sims], [index]

    def best(self) -> tuple[Tensor, Tensor]:
        """(b, k) similarities and indices, best first."""
        return select_topk(torch.cat(self.sims, dim=1), torch.cat(self.index, dim=1), self.k)


def knn(queries: ArrayLike, k: int, gallery: ArrayLike | None = None, *,
        backend: Backend = "auto", block: int | None = None) -> tuple[Tensor, Tensor]:
    """The k most similar gallery rows of every query, by cosine similarity.

    Without ``gallery`` the queries are the gallery and no query retrieves itself. When the
    queries are the gallery the similarity matrix is symmetric: each tile of its upper triangle
    is computed once and serves both its rows and (transposed) its columns.

    Args:
        queries: (Nq, d) float16/32/64, numpy or torch, on any device.
        k: neighbours per query, 1 <= k <= gallery size (excluding the query itself).
        gallery: (Ng, d) or None, on the queries' device.
        backend: ``"auto"`` (the fastest engine here for a large float32 CPU search, else
            torch), ``"torch"`` or ``"numpy"`` (exact tiled products by that library's BLAS), or
            ``"faiss"`` (IndexFlatIP on the CPU); the same tie rule for all.
        block: at most this many rows per tile; memory is O(block x block + N x k). None:
            4,096 on a CPU; on an accelerator as large as a quarter of its free memory allows
            (``block_for_memory``), so that a million rows take hundreds of tiles, not tens of
            thousands of small ones each paying its launches and one host sync.

    Returns:
        similarities (Nq, k) float and indices (Nq, k) int64 into the gallery, best first, on
        the queries' device.
    """
    q = torch.nn.functional.normalize(as_tensor(queries, "queries"), dim=1)
    g = None if gallery is None else torch.nn.functional.normalize(
        as_tensor(gallery, "gallery"), dim=1)
    zero = int((~q.any(dim=1)).sum()) + (0 if g is None else int((~g.any(dim=1)).sum()))
    if zero:
        warnings.warn(f"{zero} embedding(s) are all zero: their similarity to everything is 0, "
                      f"so they rank (and are ranked) by index only; check the model's output",
                      stacklevel=2)
    if g is not None and g.shape[1] != q.shape[1]:
        raise ValueError(f"queries have width {q.shape[1]} but gallery has {g.shape[1]}")
    if g is not None and g.device != q.device:
        raise ValueError(f"queries are on {q.device} but the gallery is on {g.device}; "
                         f"move both to one device")
    if g is not None and g.dtype != q.dtype:
        g = g.to(torch.promote_types(g.dtype, q.dtype))
        q = q.to(g.dtype)
    if q.shape[0] == 0:
        raise ValueError("the queries are empty (0 rows); give at least one embedding")
    available = q.shape[0] - 1 if g is None else g.shape[0]
    k = check_k(k, available, what="items in the gallery" if g is not None else
                "other queries (a query is never its own neighbour)")
    if block is None:
        block = default_block(q.device)
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")
    if backend not in ("auto", *ENGINES):
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(ENGINES)}")
    engine: Engine = choose(q, available + 1, k) if backend == "auto" else backend
    if engine == "bf16" and q.dtype != torch.float32:
        raise ValueError(f"backend='bf16' re-ranks in float32; got {q.dtype} rows")
    with float32_products(q.device):  # not the caller's autocast or TF32
        return _search(q, g, k, block, engine)


def _search(q: Tensor, g: Tensor | None, k: int, block: int,
            engine: Engine) -> tuple[Tensor, Tensor]:
    """``knn`` of its checked, unit rows with ``engine``."""
    if engine == "faiss":
        return _knn_faiss(q, k, g)

    def tiles(product: Product) -> tuple[Tensor, Tensor]:
        return _knn_self(q, k, block, product) if g is None else \
            _knn_gallery(q, g, k, block, product)

    if engine == "bf16":
        return knn_bf16(q, k, g, functools.partial(_exact_block, block=block),
                        lambda: tiles(tile_product("torch")))
    return tiles(tile_product(engine))


def probe_rows(rows: int, width: int) -> Tensor:
    """The random (rows, width) float32 rows the engines are measured on (seed 0)."""
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(0))


def search_seconds(x: ArrayLike, k: int, engine: Engine, repeats: int) -> list[float]:
    """Seconds of ``repeats`` consecutive searches of ``x`` among itself with ``engine``, after
    a warm-up call."""
    knn(x, k, backend=engine)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        knn(x, k, backend=engine)
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_engines(repeats: int = 2) -> dict[Engine, float]:
    """Median seconds of each available engine's whole search (``PROBE``: k nearest neighbours of
    ``probe_rows`` among themselves), over ``repeats`` consecutive calls after a warm-up call.
    Not interleaved: a BLAS whose threads keep spinning after its product slows torch's next
    operations (numpy's OpenBLAS doubled the time of torch's top-k on an Intel Xeon), and that
    cost belongs to the engine that causes it."""
    rows, width, k = PROBE
    x = probe_rows(rows, width)
    return {engine: statistics.median(search_seconds(x, k, engine, repeats))
            for engine in available()}


BF16_MAX_K_SHARE = 1 / 64  # k above this share of the gallery: the bf16 pass rules out too few


@functools.cache
def cpu_ranking() -> tuple[Engine, ...]:
    """The engines of large float32 CPU searches, best first: $SOFTTRIPLE_KNN_ENGINE alone, or
    all of them as measured on this machine (``engines.measured_ranking``)."""
    setting = os.environ.get("SOFTTRIPLE_KNN_ENGINE", "").strip() or "auto"  # empty: unset
    if setting in ENGINES:
        return (setting,)  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"SOFTTRIPLE_KNN_ENGINE={setting!r}; valid: auto, "
                         f"{', '.join(ENGINES)}")
    return tuple(measured_ranking(measure_engines, PROBE))


def cpu_engine() -> Engine:
    """The engine of large float32 CPU searches (the first of ``cpu_ranking``)."""
    return cpu_ranking()[0]


def choose(queries: Tensor, gallery_rows: int, k: int = 1) -> Engine:
    """The engine ``backend="auto"`` uses: the measured one for a large float32 CPU search (the
    best float32 one when k is too large a share of the gallery for the bf16 pass to rule rows
    out), torch for anything else (small, float64, or on a GPU)."""
    large = queries.shape[0] * gallery_rows * queries.shape[1] >= SMALL
    if not (large and queries.device.type == "cpu" and queries.dtype == torch.float32):
        return "torch"
    ranking = cpu_ranking()
    if ranking[0] == "bf16" and k > BF16_MAX_K_SHARE * gallery_rows and len(ranking) > 1:
        return ranking[1]
    return ranking[0]


def block_for_memory(free_bytes: int, element_bytes: int = 4) -> int:
    """Rows per tile whose (block x block) tile and its temporaries (TILE_COPIES of its bytes)
    fit in a quarter of ``free_bytes``: a multiple of 1,024 within ACCELERATOR_BLOCKS."""
    low, high = ACCELERATOR_BLOCKS
    side = int(math.sqrt(free_bytes / 4 / (TILE_COPIES * element_bytes)))
    return max(low, min(high, side // 1024 * 1024))


def default_block(device: torch.device) -> int:
    """``knn``'s tile rows on ``device``: CPU_BLOCK on a CPU, else sized to its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return block_for_memory(int(free))
    return CPU_BLOCK


def _starts(n: int, block: int) -> tuple[list[int], int]:
    """Tile starts and size: ceil(n / block) tiles of (nearly) equal size."""
    size = math.ceil(n / math.ceil(n / block))
    return list(range(0, n, size)), size


def _knn_gallery(q: Tensor, g: Tensor, k: int, block: int,
                 product: Product) -> tuple[Tensor, Tensor]:
    q_starts, q_size = _starts(q.shape[0], block)
    g_starts, g_size = _starts(g.shape[0], block)
    found = []
    for a in q_starts:
        running = _RunningTopk(k)
        rows = q[a:a + q_size]
        for c in g_starts:
            running.add(tile_topk(product(rows, g[c:c + g_size]), c, k))
        found.append(running.best())
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


def _knn_self(x: Tensor, k: int, block: int, product: Product) -> tuple[Tensor, Tensor]:
    starts, size = _starts(x.shape[0], block)
    running = [_RunningTopk(k) for _ in starts]
    found = []
    for i, a in enumerate(starts):
        rows = x[a:a + size]
        for j in range(i, len(starts)):
            b = starts[j]
            tile = product(rows, x[b:b + size])  # (b_i, b_j): serves rows i and j
            if i == j:
                tile.fill_diagonal_(float("-inf"))  # never retrieve yourself
            running[i].add(tile_topk(tile, b, k))
            if j != i:
                running[j].add(tile_topk(tile, a, k, query_dim=1))
        found.append(running[i].best())  # row block i has seen every tile now
        running[i] = _RunningTopk(k)  # free its candidates
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


def _exact_block(rows: Tensor, k: int, gallery: Tensor, offset: int | None,
                 block: int) -> tuple[Tensor, Tensor]:
    """The float32 top-k of query rows among the gallery by torch's product (when ``offset`` is
    given the rows are gallery rows offset.., each left out of its own search): the bf16
    engine's fallback for one block of queries."""
    starts, size = _starts(gallery.shape[0], block)
    running = _RunningTopk(k)
    own = None if offset is None else torch.arange(offset, offset + rows.shape[0],
                                                   device=rows.device)[:, None]
    for c in starts:
        tile = rows @ gallery[c:c + size].T
        if own is not None:
            columns = torch.arange(c, c + tile.shape[1], device=rows.device)[None, :]
            tile[own == columns] = float("-inf")
        running.add(tile_topk(tile, c, k))
    return running.best()


def _knn_faiss(q: Tensor, k: int, g: Tensor | None) -> tuple[Tensor, Tensor]:
    """faiss's exact search for k + 1 neighbours (k + 2 among the queries themselves, one of
    them the query); a row whose k-th and (k+1)-th similarities tie is redone exactly, and the
    k kept are ordered by (similarity desc, index asc): the tie rule of the tiles."""
    try:
        import faiss  # noqa: F401
    except ImportError as error:
        raise ValueError("backend='faiss' needs faiss: pip install 'softtriple[faiss]'") from error
    device, dtype = q.device, q.dtype
    qc = q.detach().cpu()
    gc = qc if g is None else g.detach().cpu()
    qn = np.ascontiguousarray(qc.numpy(), dtype=np.float32)
    gn = qn if g is None else np.ascontiguousarray(gc.numpy(), dtype=np.float32)
    own = 1 if g is None else 0
    want = min(k + 1 + own, len(gn))
    sims_n, ids_n = faiss_search(qn, gn, want, blas=g is not None)
    sims_t, ids_t = torch.from_numpy(sims_n), torch.from_numpy(ids_n).long()
    if g is None:  # drop the query itself (or the last neighbour when duplicates hid it)
        drop = ids_t == torch.arange(len(qn))[:, None]
        drop[:, -1] |= ~drop.any(dim=1)
        sims_t, ids_t = sims_t[~drop].view(len(qn), -1), ids_t[~drop].view(len(qn), -1)
    if sims_t.shape[1] > k:  # a (k+1)-th neighbour: is the k-th place tied?
        tied = sims_t[:, k - 1] == sims_t[:, k]
        sims_t, ids_t = sims_t[:, :k].contiguous(), ids_t[:, :k].contiguous()
    else:
        tied = torch.zeros(len(qn), dtype=torch.bool)
    tied |= ~qc.any(dim=1)  # an all-zero query: every similarity is 0
    order = torch.argsort(ids_t, dim=1)  # ascending index, then a stable sort by similarity
    sims_t, ids_t = sims_t.gather(1, order), ids_t.gather(1, order)
    order = torch.sort(sims_t, dim=1, descending=True, stable=True).indices
    sims_t, ids_t = sims_t.gather(1, order), ids_t.gather(1, order)
    redo = tied.nonzero()[:, 0]
    if len(redo):
        gf = torch.from_numpy(gn)
        row_sims = torch.from_numpy(qn[redo.numpy()]) @ gf.T  # (r, Ng)
        if g is None:
            row_sims[torch.arange(len(redo)), redo] = float("-inf")
        sims_t[redo], ids_t[redo] = select_topk(row_sims, torch.arange(len(gn)), k)
    return sims_t.to(device, dtype), ids_t.to(device)
