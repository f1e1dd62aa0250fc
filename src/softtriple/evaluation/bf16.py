"""Exact k nearest neighbours from a bfloat16 candidate pass with a proven bound and an exact
float32 re-rank: the ``bf16`` engine of ``knn``.

A bf16 product runs several times faster than a float32 one where the hardware has bf16 units
(AMX and AVX512-BF16 CPUs, GPU tensor cores), but its similarities are off by up to a few 1e-3.
This module keeps the float32 answer exact:

1. **The bound.** For rows q, g (unit in float32), their bf16 copies q~ = q + dq, g~ = g + dg,
   the similarity the bf16 product returns, s~, and the float32 one, s32, differ by at most

       beta = max|dg| max|q| + max|dq| max|g~|          (conversion: q . dg + dq . g~, each
                                                        bounded by Cauchy-Schwarz)
            + gamma_d max|q~| max|g~|                    (the product's float32 accumulation)
            + 2^-8 max|q~| max|g~|                       (its result rounded to bf16)
            + gamma_d max|q| max|g|                      (float32's own accumulation error)

   with |.| the rows' 2-norms, measured here (so the bound holds for these rows, not for unit
   rows in general), and gamma_d = d u / (1 - d u), u = 2^-24, the classic bound on a sum of d
   products in float32 (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1). The
   bf16 product accumulates in float32 (oneDNN does; cuBLAS does once its reduced-precision
   reductions are off, which ``knn`` sees to: evaluation/float32.py) and rounds its result to
   bf16 (2^-8 relative: bf16 keeps 8 significant bits). For d = 512 unit rows beta is about 0.008;
   on eval_speed's clustered rows the largest error was 0.00096
   (benchmarks/results/eval_speed_bf16.json), and tests/test_knn_bf16.py builds rows whose
   error passes 1e-3 and checks it stays below beta.
2. **The candidates.** If j is in a query's float32 top-k, s32_j >= s32_(k) (the k-th best),
   and the k-th best bf16 similarity s~_(k) <= s32_(k) + beta, so s~_j >= s32_j - beta >=
   s~_(k) - 2 beta. Every gallery row within 2 beta of the k-th best bf16 similarity is kept.
3. **The re-rank.** Per block of queries, the union U of their candidates is re-scored by one
   float32 product (the rows of U only) and the top k taken by (similarity desc, index asc),
   the kNN's tie rule. Where a block's union holds more than FALLBACK_SHARE of the gallery
   (data where bf16 cannot tell rows apart, e.g. near-duplicates everywhere), the block takes
   the exact float32 path instead. When the first two blocks both fall back, the whole search
   goes to the float32 path (the bf16 engine then costs it plus two blocks); once half of the
   blocks have fallen back, the remaining ones go straight to it.

The float32 similarities of U come from the same BLAS product as the float32 engine's tiles,
so the neighbours are the float32 path's; like every engine, where float32 rounding itself
decides (two rows whose float32 similarities differ in the last bit or not at all) the tie rule
decides on the values this product returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from softtriple.evaluation.topk import select_topk

FALLBACK_SHARE = 0.5  # a block's union of candidates above this share of the gallery: exact path
STRIP_BYTES = 64 * 2**20  # bf16 similarities of one block of queries against the whole gallery
MAX_BLOCK_ROWS = 256
EARLY_BLOCKS = 2  # blocks tried before data where every block falls back go to float32
FLOAT32_UNIT = 2.0**-24
BF16_UNIT = 2.0**-8


def similarity_bound(q: Tensor, q16: Tensor, g: Tensor, g16: Tensor) -> float:
    """beta: the largest |s~ - s32| for any query row of q (float32) and gallery row of g, given
    their bf16 copies (the module docstring derives it)."""
    d = q.shape[1]
    gamma = d * FLOAT32_UNIT / (1 - d * FLOAT32_UNIT)

    def largest(x: Tensor) -> float:
        return float(torch.linalg.vector_norm(x.float(), dim=1).max())

    nq, ng, nq16, ng16 = largest(q), largest(g), largest(q16), largest(g16)
    dq, dg = largest(q16.float() - q), largest(g16.float() - g)
    return (dg * nq + dq * ng16 + gamma * nq16 * ng16 + BF16_UNIT * nq16 * ng16
            + gamma * nq * ng)


def bf16_at_or_above(t: Tensor) -> Tensor:
    """The smallest bf16 value >= each float32 value of ``t`` (finite), as bf16: for a bf16 s,
    s >= t exactly when s >= this, so a band's comparison can stay in bf16. bf16 is the upper
    half of float32's bits: round the magnitude up (t >= 0) or down (t < 0) to a multiple of
    2^16 in the bit pattern."""
    bits = t.float().contiguous().view(torch.int32)
    low = -(2**16)  # 0xFFFF0000: clears the 16 bits bf16 drops
    up = torch.where(t >= 0, (bits + (2**16 - 1)) & low, bits & low)
    return up.view(torch.float32).to(torch.bfloat16)


def strip_rows(gallery_rows: int) -> int:
    """Queries per block: at most MAX_BLOCK_ROWS (a larger block's union of candidates only
    grows), fewer where their bf16 similarities to the whole gallery would pass STRIP_BYTES."""
    return max(16, min(MAX_BLOCK_ROWS, STRIP_BYTES // (2 * max(1, gallery_rows))))


def knn_bf16(q: Tensor, k: int, g: Tensor | None,
             exact: Callable[[Tensor, int, Tensor, int | None], tuple[Tensor, Tensor]],
             exact_all: Callable[[], tuple[Tensor, Tensor]] | None = None,
             ) -> tuple[Tensor, Tensor]:
    """The exact top-k (similarity desc, index asc) of unit float32 rows q among g (among q
    itself, never a query's own row, when g is None), as the float32 path gives it.

    Args:
        q: (Nq, d) L2-normalized float32 queries. g: (Ng, d) likewise, or None.
        exact: the float32 search of one block for the fallback, ``exact(rows, k, gallery,
            offset)``: offset None, or (a self-search) the rows' first index in the gallery.
        exact_all: the float32 search of all queries, taken when the first EARLY_BLOCKS blocks
            all fall back (it can be faster than block by block: a self-search's tiles serve
            their rows and their columns); None: block by block.

    Returns:
        (Nq, k) float32 similarities and int64 gallery indices, best first.
    """
    self_search = g is None
    gallery = q if g is None else g
    q16 = q.to(torch.bfloat16)
    g16 = q16 if g is None else g.to(torch.bfloat16)
    beta = similarity_bound(q, q16, gallery, g16)
    n = gallery.shape[0]
    size = strip_rows(n)
    sims_out, index_out = [], []
    columns = torch.arange(n, device=q.device)
    fell_back = 0
    for number, a in enumerate(range(0, q.shape[0], size)):
        rows, rows16 = q[a:a + size], q16[a:a + size]
        b = rows.shape[0]
        if number == EARLY_BLOCKS and fell_back == number and exact_all is not None:
            return exact_all()  # bf16 rules no rows out on these data: stop paying for it
        if number >= EARLY_BLOCKS and fell_back * 2 >= number:  # the same, block by block
            found = exact(rows, k, gallery, a if self_search else None)
            sims_out.append(found[0])
            index_out.append(found[1])
            continue
        own = torch.arange(a, a + b, device=q.device)  # the rows' own gallery indices
        # (b, n): s~, kept in bf16: a float32 copy cost as much as the bf16 product itself
        # in an SOP-size anatomy, and so did a bf16-to-float32 comparison
        strip = rows16 @ g16.T
        if self_search:
            strip[own - a, own] = float("-inf")
        kth = strip.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True).float()
        threshold = bf16_at_or_above(kth - 2 * beta)  # (b, 1): s~ >= it iff s~ >= kth - 2 beta
        union = (strip >= threshold).any(dim=0)  # (n,): a candidate of some row
        del strip
        chosen = columns[union]  # (u,) ascending
        if chosen.numel() > FALLBACK_SHARE * n:
            fell_back += 1
            found = exact(rows, k, gallery, a if self_search else None)
        else:
            sims = rows @ gallery[chosen].T  # (b, u): float32, exact
            if self_search:
                sims[chosen[None, :] == own[:, None]] = float("-inf")
            found = select_topk(sims, chosen, k)
        sims_out.append(found[0])
        index_out.append(found[1])
    return torch.cat(sims_out), torch.cat(index_out)
