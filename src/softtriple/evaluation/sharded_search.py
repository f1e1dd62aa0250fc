"""Exact kNN and retrieval metrics over a gallery sharded across processes (torch.distributed).

Each rank keeps its own shard of the gallery (rows ``offset`` to ``offset + m_r - 1`` of the whole
gallery, shards in rank order) and its own queries. The queries go round in blocks: each rank in
turn broadcasts a block of its queries, every rank finds that block's exact top-k in its shard
(``knn``), and the owner gathers the W candidate lists and keeps the k best by (similarity
descending, gallery index ascending), the single-process tie rule. No rank ever holds more than
its shard, one query block and W x k candidates per query, so the gallery can outgrow any one
process's memory; the result equals ``knn`` on the whole gallery (indices and similarities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor

from softtriple.distributed import gather, gather_to_main, size_and_rank
from softtriple.evaluation.clustering import KMeansSettings
from softtriple.evaluation.knn import ArrayLike, as_numpy, as_tensor, check_k, knn
from softtriple.evaluation.metrics import (
    CLUSTER_METRICS,
    RETRIEVAL_METRICS,
    Neighbours,
    check_ks,
    evaluate,
    required_k,
    retrieval_metrics,
)
from softtriple.evaluation.topk import select_topk


def _sizes(n: int) -> list[int]:
    """Every rank's ``n``, in rank order."""
    return [int(v) for v in gather(n)]


def _without_self(sims: Tensor, index: Tensor, own: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Drop each row's own gallery index from its k + 1 best (or the last, when duplicates of
    equal similarity and lower index pushed it out): the k best of the others."""
    is_self = index == own[:, None]
    is_self[:, -1] |= ~is_self.any(dim=1)
    keep = ~is_self
    return sims[keep].view(-1, k), index[keep].view(-1, k)


def sharded_knn(queries: ArrayLike, gallery: ArrayLike | None, k: int, *,
                query_block: int = 4096, block: int | None = None) -> tuple[Tensor, Tensor]:
    """The exact k most similar rows, over all ranks' gallery shards, of this rank's queries.

    Args:
        queries: (n_r, d) this rank's queries.
        gallery: (m_r, d) this rank's gallery shard, or None: the queries are the shard (the
            gallery is all ranks' queries, in rank order) and no query retrieves itself.
        k: neighbours per query, at most the whole gallery's size (minus one without gallery).
        query_block: queries broadcast at a time.
        block: tile size of each rank's local ``knn`` (None: its default for the device).

    Returns:
        similarities (n_r, k) and global gallery indices (n_r, k), best first, on the queries'
        device; in one process, ``knn(queries, k, gallery)``.
    """
    q = torch.nn.functional.normalize(as_tensor(queries, "queries"), dim=1)
    self_search = gallery is None
    g = q if gallery is None else torch.nn.functional.normalize(as_tensor(gallery, "gallery"),
                                                                 dim=1)
    world, me = size_and_rank()
    if world == 1:
        return knn(q, k, None if self_search else g, block=block)
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"queries have width {q.shape[1]} but the gallery has {g.shape[1]}")
    query_sizes, shard_sizes = _sizes(q.shape[0]), _sizes(g.shape[0])
    total = sum(shard_sizes)
    available = total - 1 if self_search else total
    k = check_k(k, available, what="items in the whole gallery" if not self_search else
                "other queries in the whole gallery (a query is never its own neighbour)")
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)]).tolist()
    my_offset, mine = offsets[me], shard_sizes[me]
    found_sims, found_index = [], []
    for owner in range(world):
        for start in range(0, query_sizes[owner], query_block):
            rows = min(query_block, query_sizes[owner] - start)
            part = q[start:start + rows] if owner == me else q.new_empty(rows, q.shape[1])
            tdist.broadcast(part, src=owner)
            extra = 1 if self_search and owner == me else 0
            want = min(k + extra, mine)
            sims = torch.full((rows, k), float("-inf"), dtype=q.dtype, device=q.device)
            index = (total + torch.arange(k, device=q.device)).expand(rows, k).clone()
            if want > 0:
                local_sims, local_index = knn(part, want, g, block=block)
                local_index = local_index + my_offset
                if extra:
                    own = my_offset + start + torch.arange(rows, device=q.device)
                    if want == k + 1:
                        local_sims, local_index = _without_self(local_sims, local_index, own, k)
                    else:  # the whole shard fits in k + 1: drop the row itself exactly
                        keep = local_index != own[:, None]
                        local_sims = local_sims[keep].view(rows, want - 1)
                        local_index = local_index[keep].view(rows, want - 1)
                width = local_sims.shape[1]
                sims[:, :width], index[:, :width] = local_sims, local_index
            # pad indices differ per rank, so every row's candidates stay distinct
            index[sims == float("-inf")] += me * k
            gathered_sims = [torch.empty_like(sims) for _ in range(world)] if owner == me \
                else None
            gathered_index = [torch.empty_like(index) for _ in range(world)] if owner == me \
                else None
            tdist.gather(sims, gathered_sims, dst=owner)
            tdist.gather(index, gathered_index, dst=owner)
            if owner == me:
                assert gathered_sims is not None and gathered_index is not None
                best = select_topk(torch.cat(gathered_sims, dim=1),
                                   torch.cat(gathered_index, dim=1), k)
                found_sims.append(best[0])
                found_index.append(best[1])
    if not found_sims:
        return q.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=q.device)
    return torch.cat(found_sims), torch.cat(found_index)


def sharded_evaluate(embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8),
                     metrics: Sequence[str] = ("recall", "map_at_r"), seed: int = 0,
                     kmeans_settings: KMeansSettings = KMeansSettings()  # noqa: B008
                     ) -> dict[str, Any]:
    """``evaluate`` of the whole set, whose rows are split over the ranks in rank order: this
    rank's rows ``embeddings`` (n_r, d); ``labels`` (N,) of all rows, on every rank.

    The retrieval metrics come from ``sharded_knn`` (each rank searches its queries; rank 0
    receives only the (N, k) neighbour indices); the clustering metrics (NMI, AMI) need every
    embedding in one k-means, so for them the embeddings are gathered on rank 0. Returns the
    metrics on rank 0 and {} on the others; in one process, ``evaluate``.
    """
    if "recall" in metrics:
        ks = check_ks(ks)
    world, me = size_and_rank()
    if world == 1:
        return evaluate(embeddings, labels, ks, metrics, seed=seed,
                        kmeans_settings=kmeans_settings)
    x = as_tensor(embeddings, "embeddings")
    y = as_numpy(labels)
    if sum(_sizes(x.shape[0])) != len(y):
        raise ValueError(f"the ranks hold {sum(_sizes(x.shape[0]))} embeddings in all but "
                         f"labels has {len(y)}")
    out: dict[str, Any] = {}
    if set(metrics) & set(RETRIEVAL_METRICS):
        k = required_k(y, ks if "recall" in metrics else ())
        _, index = sharded_knn(x, None, min(k, len(y) - 1))
        parts = gather_to_main(index.cpu())
        if me == 0:
            nb = Neighbours.from_index(torch.cat(parts), y)
            out.update(retrieval_metrics(nb, ks, metrics))
    cluster = [m for m in metrics if m in CLUSTER_METRICS]
    if cluster:
        parts = gather_to_main(x.cpu())
        if me == 0:
            out.update(evaluate(torch.cat(parts).to(x.device), y, ks, cluster, seed=seed,
                                kmeans_settings=kmeans_settings))
    return out
