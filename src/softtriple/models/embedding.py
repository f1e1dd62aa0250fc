"""The embedding model: backbone features -> global average pooling -> head -> L2-normalize.

The head is a Linear layer (the paper's) or a small MLP (``head_hidden`` > 0). The model also
takes pooled backbone features (B, C) in place of images, which is how a run with
``data.feature_cache`` trains its head on features computed once (the backbone frozen)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from softtriple.data.transforms import normalize_images
from softtriple.models.backbones import Backbone


class EmbeddingModel(nn.Module):
    """x (B, 3, H, W) -> unit embeddings (B, embedding_dim) (raw ones with normalize=False).

    Images come as the transforms give them, uint8 (B, 3, H, W), and are scaled and normalized
    here with the backbone's mean and std (``normalize_images``), on the model's device; float
    images are taken as normalized already (an exported model's input, a caller's own
    preprocessing).

    Args:
        backbone: a Backbone (features and their width).
        embedding_dim: d.
        freeze_bn: keep every BatchNorm of the backbone in eval mode (running statistics fixed)
            while training, as the official SoftTriple code's ``--freeze_BN`` does.
        freeze_backbone: train only the embedding layer (and the loss); the backbone's weights
            get no gradient and its BatchNorm statistics stay fixed.
        head_hidden: 0 for a Linear head (C -> d); else an MLP C -> head_hidden -> ReLU -> d.
        normalize: L2-normalize the output (the paper's); False gives the raw head output, for
            losses defined on unnormalized embeddings (N-pairs, lifted structure). Retrieval is
            by cosine similarity either way.
    """

    input_mean: Tensor  # (3, 1, 1) float32 buffers
    input_std: Tensor

    def __init__(self, backbone: Backbone, embedding_dim: int, freeze_bn: bool = False,
                 freeze_backbone: bool = False, head_hidden: int = 0,
                 normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone.features
        self.feature_dim = backbone.out_channels
        self.embedding: nn.Module = (
            nn.Linear(backbone.out_channels, embedding_dim) if head_hidden == 0 else
            nn.Sequential(nn.Linear(backbone.out_channels, head_hidden), nn.ReLU(inplace=True),
                          nn.Linear(head_hidden, embedding_dim)))
        self.mean, self.std = backbone.mean, backbone.std
        # (3, 1, 1) on the model's device, out of the state dict (the backbone defines them)
        self.register_buffer("input_mean", torch.tensor(self.mean).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.tensor(self.std).view(3, 1, 1),
                             persistent=False)
        self.interpolation = backbone.interpolation
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.freeze_bn = freeze_bn or freeze_backbone
        self.backbone.requires_grad_(not freeze_backbone)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (B, C) of images x (B, 3, H, W), uint8 or normalized float:
        the global average as a mean over (H, W), bitwise nn.AdaptiveAvgPool2d(1)'s on the CPU,
        whose CUDA backward has no deterministic kernel (it would refuse to run under
        ``run.deterministic``)."""
        if x.dtype == torch.uint8:
            x = normalize_images(x, self.input_mean, self.input_std)
        return self.backbone(x).mean(dim=(2, 3))  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W), or their pooled features (B, C), -> unit embeddings (B, d)."""
        features = x if x.dim() == 2 else self.features(x)  # (B, C)
        out = self.embedding(features)  # (B, d)
        return F.normalize(out, dim=1) if self.normalize else out  # type: ignore[no-any-return]


@torch.no_grad()
def embed(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
          autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
          pad_last: bool | None = None,
          forward: Callable[[Tensor], Tensor] | None = None,
          progress: str | None = None) -> np.ndarray:
    """Embeddings (N, d) float32 of every (image, label, index) batch of ``loader``, in order,
    with ``model`` (already on ``device``) in eval mode, under autocast to ``autocast_dtype``
    (bf16 / fp16) when given. On CUDA the host waits for the device once, at the end, not per
    batch (each batch's embeddings copied to pinned memory asynchronously).

    ``forward``: what to compute of each batch in place of ``model(images)`` (the feature
    cache's ``model.features``: pooled backbone features (N, C)). ``progress``: a progress
    bar's label (tqdm), or None for none.

    ``pad_last``: run a last, shorter batch padded to the loader's batch size (its last image
    repeated; the padding's rows dropped), so that every forward has one shape. Under cuDNN's
    autotuning each new input shape costs a search over every convolution's algorithms, seconds
    for a first evaluation, against a fraction of one batch's compute. In eval mode a row's
    embedding does not depend on the others. None (the default): pad where that autotuning is
    on (a CUDA device with ``torch.backends.cudnn.benchmark``).
    """
    model.eval()
    device = torch.device(device)
    if pad_last is None:
        pad_last = device.type == "cuda" and torch.backends.cudnn.benchmark
    full = loader.batch_size if pad_last else None
    parts = []
    for images, _, _ in tqdm(loader, desc=progress, leave=False, disable=progress is None):
        rows = images.shape[0]
        images = images.to(device, non_blocking=True)
        if full is not None and rows < full:
            images = torch.cat([images, images[-1:].expand(full - rows, *images.shape[1:])])
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = (forward or model)(images)[:rows].float()
        if device.type == "cuda":  # into pinned memory without waiting: the host goes on to
            # launch the next batch while the device computes this one
            parts.append(torch.empty(out.shape, pin_memory=True).copy_(out, non_blocking=True))
        else:
            parts.append(out.cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # every copy has landed
    width = getattr(model, "feature_dim" if forward is not None else "embedding_dim", 0)
    return torch.cat(parts).numpy() if parts else np.zeros((0, width), dtype=np.float32)
