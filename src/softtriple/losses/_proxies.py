"""The base of the losses on learned class proxies (``ProxyLoss``): SoftMax-norm's centers,
ProxyNCA's and Proxy-Anchor's proxies, CosFace's and ArcFace's class weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.losses._checks import check_batch, check_classes, check_count


class ProxyLoss(nn.Module):
    """Holds and checks C and d, the Adam eps of the SoftTriple paper's recipe, and the opening
    of every forward: the batch checked against C and d, the embeddings and the proxies promoted
    to one dtype and L2-normalized (``unit_rows``). Each subclass keeps its own parameter (its
    name is in its checkpoints: ``centers``, ``proxies`` or ``weights``) and lists its
    hyperparameters in ``settings`` for ``repr``.

    Args:
        num_classes: C. embedding_dim: d.
        min_classes: 2 for a softmax over the classes (one class has nothing to tell apart), 1
            where a loss of one class still means something (Proxy-Anchor's pull).
    """

    # a mean of per-example terms (plus a term of the proxies alone): DDP's mean of the ranks'
    # gradients is the single-process gradient, so no gather is needed under DDP
    needs_global_batch: bool = False
    adam_eps: float = 0.01  # Adam's, when optimizer.eps is unset (losses.adam_eps)
    settings: tuple[str, ...] = ()

    def __init__(self, num_classes: int, embedding_dim: int, min_classes: int = 2) -> None:
        super().__init__()
        if min_classes == 2:
            check_classes(num_classes)
        else:
            check_count("num_classes", num_classes)
        check_count("embedding_dim", embedding_dim)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim

    def unit_rows(self, embeddings: Tensor, labels: Tensor,
                  proxies: Tensor) -> tuple[Tensor, Tensor]:
        """The checked batch's embeddings x (B, d) and ``proxies`` (R, d), both L2-normalized in
        their promoted dtype (float64 stays float64 for gradcheck)."""
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes)
        dtype = torch.promote_types(embeddings.dtype, proxies.dtype)
        return F.normalize(embeddings.to(dtype), dim=1), F.normalize(proxies.to(dtype), dim=1)

    def extra_repr(self) -> str:
        names = ("num_classes", "embedding_dim", *self.settings)
        return ", ".join(f"{name}={getattr(self, name)}" for name in names)
