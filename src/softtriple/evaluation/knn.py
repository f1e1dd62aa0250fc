"""Exact k-nearest-neighbour search by cosine similarity, in blocks, never an N x N matrix.

Similarity is the dot product of L2-normalized rows (cosine similarity); inputs are normalized
here, so raw embeddings are fine. Ties are broken deterministically: among equal similarities the
lower gallery index ranks first (the order of a stable descending sort), in both the selection
and the ordering of the k neighbours. The ``faiss`` backend returns the same neighbours when no
two similarities tie; on exact ties it follows faiss's own order.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray
Backend = Literal["torch", "faiss"]


def as_tensor(array: ArrayLike, name: str) -> Tensor:
    """Torch view of a numpy or torch array of floats, (N, d); float16 is widened to float32."""
    tensor = torch.as_tensor(array)
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float array (N, d); got shape "
                         f"{tuple(tensor.shape)} and dtype {tensor.dtype}")
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN or inf; drop or fix them first")
    return tensor


def _normalize(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.cpu(), dim=1)


def select_topk(sims: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of ``sims`` ranked by (similarity desc, index asc).

    Args:
        sims: (b, m) similarities.
        index: (b, m) or (m,) int64 gallery indices of the columns, all distinct within a row.
        k: how many to keep, k <= m.

    Returns:
        (b, k) similarities and (b, k) indices, best first.
    """
    if index.dim() == 1:
        index = index.expand_as(sims)
    kth = sims.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # (b, 1)
    above = sims > kth
    tied = sims == kth
    need = k - above.sum(dim=1, keepdim=True)  # how many of the tied to keep, >= 1
    if bool((tied.sum(dim=1, keepdim=True) == need).all()):
        keep = above | tied  # no tie straddles the k-th place: the common case
    else:  # among the tied, keep the `need` lowest gallery indices
        tied_key = torch.where(tied, -index, torch.iinfo(torch.int64).min)
        top_tied = tied_key.topk(k, dim=1).values  # (b, k): -index of the lowest tied indices
        cutoff = top_tied.gather(1, need - 1)  # (b, 1)
        keep = above | (tied & (tied_key >= cutoff))  # exactly k per row
    kept_sims = sims[keep].view(-1, k)
    kept_index = index[keep].view(-1, k)
    order = torch.argsort(kept_index, dim=1)  # ascending index, then stable sort by similarity
    kept_sims, kept_index = kept_sims.gather(1, order), kept_index.gather(1, order)
    order = torch.sort(kept_sims, dim=1, descending=True, stable=True).indices
    return kept_sims.gather(1, order), kept_index.gather(1, order)


def tile_topk(tile: Tensor, offset: int, k: int) -> tuple[Tensor, Tensor]:
    """The exact top-k set of each row of a (b, m) tile whose columns are offset..offset+m-1.

    One ``topk`` of k + 1 finds the k best; only rows where the k-th and (k+1)-th values tie (so
    that topk's pick among equals is arbitrary) are redone by ``select_topk``.

    Returns:
        (b, min(k, m)) similarities and gallery indices, in no particular order.
    """
    b, m = tile.shape
    k = min(k, m)
    if m == k:
        return tile, torch.arange(offset, offset + m).expand(b, m)
    sims, pos = tile.topk(k + 1, dim=1, sorted=True)  # (b, k + 1)
    ambiguous = (sims[:, k] == sims[:, k - 1]).nonzero()[:, 0]
    sims, pos = sims[:, :k].contiguous(), pos[:, :k].contiguous()
    if len(ambiguous):
        exact_sims, exact_pos = select_topk(tile[ambiguous], torch.arange(m), k)
        sims[ambiguous], pos[ambiguous] = exact_sims, exact_pos
    return sims, pos + offset


def merge_topk(best: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor],
               k: int) -> tuple[Tensor, Tensor]:
    """Merge two candidate sets (b, k1) and (b, k2) into the best k, ranked by (similarity desc,
    index asc); indices are distinct across the two sets."""
    sims, index = new
    if best is not None:
        sims, index = torch.cat([best[0], sims], dim=1), torch.cat([best[1], index], dim=1)
    order = torch.argsort(index, dim=1)
    sims, index = sims.gather(1, order), index.gather(1, order)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), index.gather(1, order)


def knn(queries: ArrayLike, k: int, gallery: ArrayLike | None = None, *,
        backend: Backend = "torch", block: int = 2048) -> tuple[Tensor, Tensor]:
    """The k most similar gallery rows of every query, by cosine similarity.

    Without ``gallery`` the queries are the gallery and no query retrieves itself. When the
    queries are the gallery the similarity matrix is symmetric: each (block x block) tile of its
    upper triangle is computed once and serves both its rows' and its columns' running top-k.

    Args:
        queries: (Nq, d) float16/32/64, numpy or torch.
        k: neighbours per query, 1 <= k <= gallery size (excluding the query itself).
        gallery: (Ng, d) or None.
        backend: ``"torch"`` (default, exact blocked products) or ``"faiss"`` (IndexFlatIP).
        block: rows per tile; memory is O(block x block + N x k).

    Returns:
        similarities (Nq, k) float and indices (Nq, k) int64 into the gallery, best first.
    """
    q = _normalize(as_tensor(queries, "queries"))
    g = None if gallery is None else _normalize(as_tensor(gallery, "gallery"))
    if g is not None and g.shape[1] != q.shape[1]:
        raise ValueError(f"queries have width {q.shape[1]} but gallery has {g.shape[1]}")
    if g is not None and g.dtype != q.dtype:
        g = g.to(torch.promote_types(g.dtype, q.dtype))
        q = q.to(g.dtype)
    available = q.shape[0] - 1 if g is None else g.shape[0]
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] (the gallery size); got {k}")
    if backend == "faiss":
        return _knn_faiss(q, k, g)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; valid: torch, faiss")
    return _knn_self(q, k, block) if g is None else _knn_gallery(q, g, k, block)


def _knn_gallery(q: Tensor, g: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    sims_out, index_out = [], []
    for start in range(0, q.shape[0], block):
        best = None
        for g_start in range(0, g.shape[0], block):
            tile = q[start:start + block] @ g[g_start:g_start + block].T  # (b, b')
            best = merge_topk(best, tile_topk(tile, g_start, k), k)
        assert best is not None
        sims_out.append(best[0])
        index_out.append(best[1])
    return torch.cat(sims_out), torch.cat(index_out)


def _knn_self(x: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    starts = list(range(0, n, block))
    best: list[tuple[Tensor, Tensor] | None] = [None] * len(starts)
    for i, a in enumerate(starts):
        rows = x[a:a + block]
        for j in range(i, len(starts)):
            b = starts[j]
            tile = rows @ x[b:b + block].T  # (b_i, b_j), serves rows i and (transposed) rows j
            if i == j:
                tile.fill_diagonal_(float("-inf"))  # never retrieve yourself
            best[i] = merge_topk(best[i], tile_topk(tile, b, k), k)
            if j != i:
                best[j] = merge_topk(best[j], tile_topk(tile.T.contiguous(), a, k), k)
    sims = torch.cat([pair[0] for pair in best if pair is not None])
    index = torch.cat([pair[1] for pair in best if pair is not None])
    return sims, index


def _knn_faiss(q: Tensor, k: int, g: Tensor | None) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError as error:
        raise ValueError("backend='faiss' needs faiss: pip install 'softtriple[faiss]'") from error
    qn = np.ascontiguousarray(q.numpy(), dtype=np.float32)
    gn = qn if g is None else np.ascontiguousarray(g.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(gn.shape[1])
    index.add(gn)
    extra = 1 if g is None else 0
    sims, ids = index.search(qn, k + extra)
    sims_t, ids_t = torch.from_numpy(sims), torch.from_numpy(ids)
    if g is None:  # drop the query itself (or the last neighbour when duplicates hid it)
        own = ids_t == torch.arange(q.shape[0])[:, None]
        own[:, -1] |= ~own.any(dim=1)
        keep = ~own
        sims_t, ids_t = sims_t[keep].view(-1, k), ids_t[keep].view(-1, k)
    return sims_t.to(q.dtype), ids_t.long()
