"""The kNN's tie rule in one function: the exact top-k of each row by (similarity desc, gallery
index asc). Every engine (``knn``'s tiles, faiss's tied rows, the bf16 engine's re-rank, the
sharded search's merge) ranks through it."""

from __future__ import annotations

import torch
from torch import Tensor


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
