"""Using a model: build it (and its loss) from a config, load a trained one from a run folder
or checkpoint, and embed a split or one image on the run's device and precision. One home for
the trainer, the CLI (evaluate, embed, search) and the report; it never imports the trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from softtriple.data import ImageDataset, ImageTable, eval_transform, load_image
from softtriple.losses import LOSSES, build_loss, loss_arguments
from softtriple.models import EmbeddingModel, build_backbone, embed
from softtriple.training.checkpoint import CheckpointError, load_checkpoint
from softtriple.training.config import Config, ConfigError, config_from_dict
from softtriple.training.data import load_table

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
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


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


def load_model(path: str | Path) -> tuple[EmbeddingModel, Config, dict[str, Any]]:
    """The trained embedding model of a run folder or checkpoint (eval mode, on the CPU), its
    config and the checkpoint's state."""
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    model = build_model(config, pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit its own model config: "
                              f"{str(error).splitlines()[0]}") from error
    return model.eval(), config, state


def split_dataset(model: EmbeddingModel, config: Config,
                  split: str) -> tuple[ImageDataset, ImageTable]:
    """A split of the config's data, preprocessed as evaluation does (the model's test
    transform), yielding (image, encoded label, index); and its table."""
    table = load_table(config.data).split(split)
    return ImageDataset(table, table.encoded_labels()[0],
                        eval_transform(config.data.image_size, model.mean, model.std,
                                       model.interpolation)), table


def embed_split(model: EmbeddingModel, config: Config,
                split: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Embeddings (N, d) float32, labels (N,), image paths and class names of a split of the
    config's data, computed on the run's device and precision."""
    device = resolve_device(config.run.device)
    dataset, table = split_dataset(model, config, split)
    labels = table.encoded_labels()[0]
    loader = DataLoader(dataset, batch_size=config.evaluation.batch_size,
                        num_workers=config.data.workers, pin_memory=device.type == "cuda")
    embeddings = embed(model.to(device), loader, device, PRECISIONS[config.run.precision],
                       config.model.channels_last)
    return embeddings, labels, [str(p) for p in table.paths], table.item_class_names()


def embed_image(model: EmbeddingModel, config: Config, image: str | Path) -> np.ndarray:
    """The embedding (d,) of one image file, with the run's test transform."""
    return embed_pil(model, config, load_image(Path(image)))


@torch.no_grad()
def embed_pil(model: EmbeddingModel, config: Config, picture: Any) -> np.ndarray:
    """The embedding (d,) of one RGB PIL image, with the run's test transform."""
    tensor = eval_transform(config.data.image_size, model.mean, model.std,
                            model.interpolation)(picture)
    return model.eval().cpu()(tensor[None]).float().numpy()[0]  # type: ignore[no-any-return]
