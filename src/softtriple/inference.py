"""Using a trained model: load it from a run folder or checkpoint, and embed a split or one image
on the run's device and precision. One home for the CLI (evaluate, embed, search), the report,
export and the search page; beside the training package (both stand on softtriple.experiment,
whose build.py makes the model and loss from a config), and neither imports the other."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from softtriple.data import ImageDataset, ImageTable, eval_transform, load_image
from softtriple.data.dataset import MAX_ASPECT, to_rgb
from softtriple.experiment.build import PRECISIONS, build_model, configure_kernels, resolve_device
from softtriple.experiment.checkpoint import CheckpointError, load_checkpoint, mismatch_detail
from softtriple.experiment.config import Config, config_from_dict
from softtriple.experiment.loaders import load_table, loader_workers
from softtriple.models import EmbeddingModel, embed


def load_model(path: str | Path) -> tuple[EmbeddingModel, Config, dict[str, Any]]:
    """The trained embedding model of a run folder or checkpoint (eval mode, on the CPU), its
    config and the checkpoint's state. A run that named ``run.device: cuda`` is used on the CPU
    where no GPU is visible (``runs_here``)."""
    state = load_checkpoint(path)
    config = runs_here(config_from_dict(state["config"]), path)
    model = build_model(config, pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit its own model config: "
                              f"{mismatch_detail(error)}") from error
    return model.eval(), config, state


def runs_here(config: Config, path: str | Path) -> Config:
    """``config`` as this machine can use it: a run trained with ``run.device: cuda`` is
    evaluated, embedded, searched and exported on the CPU where no GPU is visible (with fp32 for
    its fp16, which has no fast CPU kernels), said in one line, instead of refused; the numbers
    can differ from the run's own in float rounding."""
    if config.run.device == "cuda" and not torch.cuda.is_available():
        precision = "fp32" if config.run.precision == "fp16" else config.run.precision
        print(f"{path} ran on CUDA (run.device: cuda); no GPU is visible here, so its model runs "
              f"on the CPU in {precision} (numbers can differ from the run's in float rounding)",
              file=sys.stderr)
        config.run.device, config.run.precision = "cpu", precision
    return config


def split_dataset(model: EmbeddingModel, config: Config,
                  split: str) -> tuple[ImageDataset, ImageTable]:
    """A split of the config's data, preprocessed as evaluation does (the model's test
    transform), yielding (image, encoded label, index); and its table."""
    table = load_table(config.data).split(split)
    return ImageDataset(table, table.encoded_labels()[0],
                        eval_transform(config.data.image_size, model.interpolation)), table


def embed_split(model: EmbeddingModel, config: Config,
                split: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Embeddings (N, d) float32, labels (N,), image paths and class names of a split of the
    config's data, computed on the run's device and precision."""
    device = resolve_device(config.run.device)
    configure_kernels(device, config.run.deterministic, config.run.cudnn_benchmark)
    dataset, table = split_dataset(model, config, split)
    labels = table.encoded_labels()[0]
    loader = DataLoader(dataset, batch_size=config.evaluation.batch_size,
                        num_workers=loader_workers(config.data.workers, device.type == "cuda"),
                        pin_memory=device.type == "cuda")
    embeddings = embed(model.to(device), loader, device, PRECISIONS[config.run.precision],
                       config.model.channels_last)
    return embeddings, labels, [str(p) for p in table.paths], table.item_class_names()


def embed_image(model: EmbeddingModel, config: Config, image: str | Path) -> np.ndarray:
    """The embedding (d,) of one image file, with the run's test transform."""
    return embed_pil(model, config, load_image(Path(image), MAX_ASPECT))


@torch.no_grad()
def embed_pil(model: EmbeddingModel, config: Config, picture: Any) -> np.ndarray:
    """The embedding (d,) of one PIL image (any mode), with the run's test transform; an image
    longer than MAX_ASPECT : 1 is cropped to its central region first (``data.to_rgb``), so no
    shape of image makes the resize ask for more than a few MB."""
    tensor = eval_transform(config.data.image_size, model.interpolation)(
        to_rgb(picture, MAX_ASPECT))
    return model.eval().cpu()(tensor[None]).float().numpy()[0]  # type: ignore[no-any-return]
