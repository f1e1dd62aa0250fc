"""The build layer: the device, precision, embedding model and loss that a Config describes.
Below the trainer and inference (both call it); it imports neither."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from softtriple.distributed import local_rank
from softtriple.experiment.config import Config, ConfigError
from softtriple.losses import LOSSES, build_loss, loss_arguments
from softtriple.models import EmbeddingModel, build_backbone

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device ``run.device`` names (auto: CUDA when visible); under torchrun, GPU number
    LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no GPU is visible; use auto or cpu")
    if name == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def configure_kernels(device: torch.device, deterministic: bool,
                      cudnn_benchmark: bool = True) -> None:
    """Process-wide kernel choice for ``run.deterministic`` and ``run.cudnn_benchmark``.

    Deterministic: every op must use a deterministic kernel (``torch.use_deterministic_algorithms``
    raises on one that has none), cuDNN deterministic with no autotuning, and cuBLAS a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when a process first uses
    it: set here before any product, kept if the user set it). Otherwise torch's defaults, with
    cuDNN autotuning as ``cudnn_benchmark`` says. The CPU's kernels are deterministic either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic


def build_model(config: Config, pretrained: bool = True) -> EmbeddingModel:
    """The embedding model ``config.model`` describes (pretrained weights where it names some)."""
    backbone = build_backbone(config.model.backbone, config.model.weights, pretrained,
                              fetch=pretrained and config.model.pretrained,
                              options=config.model.backbone_args)
    return EmbeddingModel(backbone, config.model.embedding_dim, config.model.freeze_bn,
                          config.model.freeze_backbone, config.model.head_hidden,
                          config.model.normalize)


# the losses whose centers loss.shard_centers can shard, as arguments of ShardedSoftTripleLoss
SHARDABLE: dict[str, dict[str, Any]] = {
    "softtriple": {}, "hardtriple": {"gamma": 0.0},
    "softmax_norm": {"centers_per_class": 1, "tau": 0.0}}


def build_config_loss(config: Config, num_classes: int) -> nn.Module:
    """The loss ``config.loss`` names, sized for ``num_classes`` training classes; with
    ``loss.shard_centers`` this process's block of a ShardedSoftTripleLoss."""
    if config.loss.name not in LOSSES:
        raise ConfigError(f"unknown loss.name {config.loss.name!r}; valid: {', '.join(LOSSES)}")
    if config.loss.shard_centers:
        from softtriple.losses.sharded import ShardedSoftTripleLoss
        if config.loss.name not in SHARDABLE:
            raise ConfigError(f"loss.shard_centers applies to {', '.join(SHARDABLE)}; "
                              f"{config.loss.name} has no class centers to shard")
        args = dict(config.loss.args) | SHARDABLE[config.loss.name]
        try:
            return ShardedSoftTripleLoss(num_classes, config.model.embedding_dim, **args,
                                         seed=config.run.seed)
        except TypeError as error:
            raise ConfigError(f"loss.args {sorted(config.loss.args)} do not fit the sharded "
                              f"{config.loss.name}: {error}") from error
    params = loss_arguments(config.loss.name)
    sized = {"num_classes": num_classes, "embedding_dim": config.model.embedding_dim}
    kwargs = {k: v for k, v in sized.items() if k in params} | dict(config.loss.args)
    return build_loss(config.loss.name, **kwargs)


