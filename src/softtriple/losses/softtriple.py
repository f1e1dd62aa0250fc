"""SoftTriple loss (Qian et al., "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling",
ICCV 2019) and its hard-max variant HardTriple."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.losses._checks import (
    check_batch,
    check_classes,
    check_count,
    check_positive,
    check_scale,
)
from softtriple.losses._fused import center_regularizer_fused, smoothed_max_similarity
from softtriple.losses._precision import float32_forward
from softtriple.losses.softmax_norm import init_centers, margin_cross_entropy


def relaxed_class_similarity(x: Tensor, centers: Tensor, gamma: float) -> Tensor:
    """The relaxed similarity S_{i,c} = sum_k softmax_k(s_{i,c,k} / gamma) s_{i,c,k} (paper eq. 7).

    With ``gamma == 0`` this is the hard max over a class's centers (HardTriple).

    Args:
        x: (B, d) L2-normalized embeddings.
        centers: (C, K, d) L2-normalized centers w_c^k.
        gamma: the entropy weight gamma >= 0.

    Returns:
        (B, C) class similarities.
    """
    num_classes, k, d = centers.shape
    s = (x @ centers.reshape(num_classes * k, d).T).view(-1, num_classes, k)  # (B, C, K)
    if gamma == 0:
        return s.amax(dim=2)
    q = torch.softmax(s / gamma, dim=2)  # (B, C, K)
    return (q * s).sum(dim=2)


def class_similarity(x: Tensor, centers: Tensor, gamma: float, chunk: int = 1024,
                     compiled: bool = False) -> Tensor:
    """SoftTriple's class similarities S (B, C) of normalized embeddings x (B, d) to raw centers
    (C, K, d), C any block of classes: K = 1 is SoftMax-norm's x . w_c (the same operations, so
    K = 1 trains bitwise like SoftMaxNormLoss), gamma > 0 the fused, class-chunked smoothed max
    (it normalizes the centers inside its product), gamma = 0 the hard max."""
    if centers.shape[1] == 1:  # no max to smooth
        return x @ F.normalize(centers[:, 0], dim=1).T
    if gamma > 0:
        return smoothed_max_similarity(x, centers, gamma, chunk, compiled)
    return relaxed_class_similarity(x, F.normalize(centers, dim=2), 0.0)


def check_arguments(num_classes: int, embedding_dim: int, centers_per_class: int, la: float,
                    gamma: float, tau: float, margin: float) -> None:
    """ValueError naming the first of SoftTriple's arguments out of range (C >= 2; d, K >= 1;
    0 < lambda < 1e4; gamma, tau, delta >= 0)."""
    check_classes(num_classes)
    check_count("embedding_dim", embedding_dim)
    check_count("centers_per_class", centers_per_class)
    check_scale("la", la)
    check_positive("gamma", gamma, allow_zero=True)
    check_positive("tau", tau, allow_zero=True)
    check_positive("margin", margin, allow_zero=True)


MERGE_THRESHOLD = 0.9  # cosine similarity above which two centers of a class count as one


@torch.no_grad()
def effective_center_counts(centers: Tensor, threshold: float = MERGE_THRESHOLD) -> Tensor:
    """Centers left per class (C,) of centers (C, K, d) after merging those whose cosine
    similarity exceeds ``threshold`` (connected components, so merging is transitive)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1]; got {threshold}")
    w = F.normalize(centers.float(), dim=2)
    k = centers.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=w.device)
    reach = (w @ w.transpose(1, 2) > threshold) | eye  # (C, K, K)
    for _ in range(max(1, k.bit_length())):  # transitive closure by repeated squaring
        reach = (reach.float() @ reach.float()) > 0
    # a center starts a new group when it reaches no center of lower index
    lower = torch.tril(torch.ones(k, k, dtype=torch.bool, device=w.device), diagonal=-1)
    return (~(reach & lower).any(dim=2)).sum(dim=1)

class SoftTripleLoss(nn.Module):
    """SoftTriple loss: K centers per class, an entropy-smoothed max over them, a margin, and an
    L2,1-style regularizer that merges redundant centers (Qian et al., ICCV 2019, eq. 8-10).

    Embeddings and centers are L2-normalized inside, so callers may pass raw model outputs.

    Args:
        num_classes: C, the number of training classes.
        embedding_dim: d, the embedding width.
        centers_per_class: K, the centers per class (K = 1 is SoftMax norm).
        la: lambda, the scale of the logits.
        gamma: gamma, the entropy weight of the smoothed max; 0 selects the hard max (HardTriple).
        tau: tau, the weight of the center regularizer (ignored when K = 1).
        margin: delta, subtracted from the true class's similarity.
        compiled: fuse the element-wise work with torch.compile: about 1.2x faster per step at
            Stanford Online Products scale on a CPU, after a one-off compile of several seconds
            (needs a C++ compiler); see docs/PERFORMANCE.md.

    Shapes:
        embeddings: (B, d) float; labels: (B,) int64 in [0, C); returns a scalar.
        centers: nn.Parameter (C, K, d); row (c, k) is center k of class c.

    With gamma > 0 the class similarity runs through a fused, class-chunked autograd function
    (``_fused.py``, ``chunk`` classes at a time); ``relaxed_class_similarity`` is the simple
    reference it is tested against, and serves gamma = 0.

    Several processes (DDP): each rank's loss is the mean over its own examples, so DDP's mean of
    the ranks' gradients is the single-process gradient and no batch is gathered; the centers
    are replicated inside the DDP module. For catalogues too large to replicate,
    ``ShardedSoftTripleLoss`` gives each rank a block of the classes' centers.
    """

    # a mean of per-example terms (plus a term of the centers alone): DDP's mean of the ranks'
    # gradients is the single-process gradient, so no gather is needed under DDP
    needs_global_batch: bool = False
    adam_eps: float = 0.01  # Adam's, when optimizer.eps is unset (losses.adam_eps)

    chunk: int = 1024

    def __init__(self, num_classes: int, embedding_dim: int, centers_per_class: int = 10,
                 la: float = 20.0, gamma: float = 0.1, tau: float = 0.2,
                 margin: float = 0.01, compiled: bool = False) -> None:
        super().__init__()
        check_arguments(num_classes, embedding_dim, centers_per_class, la, gamma, tau, margin)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.centers_per_class = centers_per_class
        self.la, self.gamma = float(la), float(gamma)
        self.tau, self.margin = float(tau), float(margin)
        self.compiled = bool(compiled)
        weight = init_centers(num_classes * centers_per_class, embedding_dim)
        self.centers = nn.Parameter(weight.view(num_classes, centers_per_class, embedding_dim))

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes)
        dtype = torch.promote_types(embeddings.dtype, self.centers.dtype)
        x = F.normalize(embeddings.to(dtype), dim=1)  # (B, d)
        centers = self.centers.to(dtype)  # (C, K, d)
        similarity = class_similarity(x, centers, self.gamma, self.chunk, self.compiled)
        loss = margin_cross_entropy(similarity, labels, self.la, self.margin)
        if self.tau > 0 and self.centers_per_class > 1:
            loss = loss + self.tau * center_regularizer_fused(centers)
        return loss

    @torch.no_grad()
    def effective_centers(self, threshold: float = MERGE_THRESHOLD) -> Tensor:
        """Centers left per class after merging those closer than ``threshold``.

        Two centers of a class are linked when their cosine similarity exceeds ``threshold``;
        linked groups (connected components, so merging is transitive) count as one center.

        Args:
            threshold: cosine similarity in [-1, 1] above which two centers are one.

        Returns:
            (C,) int64 tensor of counts in [1, K]; ``.float().mean()`` gives the average.
        """
        return effective_center_counts(self.centers, threshold)

    @torch.no_grad()
    def init_centers_from(self, embeddings: Tensor, labels: Tensor, seed: int = 0) -> None:
        """Centers from the data instead of at random (a variant the paper did not try): each
        class's K centers are the k-means centroids (scikit-learn, k-means++, 3 starts) of its
        L2-normalized embeddings; a class with fewer than K examples keeps its examples and
        fills the rest with random unit vectors near them (noise 0.01), so that no two
        centers start equal.

        Args:
            embeddings: (N, d) the initial model's training embeddings. labels: (N,) in [0, C).
            seed: k-means's and the filling's random state.
        """
        from sklearn.cluster import KMeans

        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim or \
                labels.shape != embeddings.shape[:1]:
            raise ValueError(f"init_centers_from needs (N, {self.embedding_dim}) embeddings and "
                             f"(N,) labels; got {tuple(embeddings.shape)} and "
                             f"{tuple(labels.shape)}")
        x = torch.nn.functional.normalize(embeddings.detach().double().cpu(), dim=1)
        y = labels.cpu()
        k = self.centers_per_class
        generator = torch.Generator().manual_seed(seed)
        for c in torch.unique(y).tolist():
            points = x[y == c]
            if len(points) >= k:
                fit = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(points.numpy())
                rows = torch.from_numpy(fit.cluster_centers_)
            else:
                extra = points[torch.arange(k - len(points)) % len(points)]
                noise = 0.01 * torch.randn(extra.shape, generator=generator, dtype=extra.dtype)
                rows = torch.cat([points, extra + noise])
            self.centers[c] = torch.nn.functional.normalize(rows, dim=1).to(self.centers)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
                f"tau={self.tau}, margin={self.margin}, compiled={self.compiled}")


class HardTripleLoss(SoftTripleLoss):
    """HardTriple (Qian et al. 2019, eq. 6): SoftTriple with the hard max over a class's centers,
    i.e. ``SoftTripleLoss(..., gamma=0)``; same arguments without ``gamma``."""

    def __init__(self, num_classes: int, embedding_dim: int, centers_per_class: int = 10,
                 la: float = 20.0, tau: float = 0.2, margin: float = 0.01) -> None:
        super().__init__(num_classes, embedding_dim, centers_per_class, la=la, gamma=0.0,
                         tau=tau, margin=margin)
