"""Training: configuration, the trainer, checkpoints and multi-process support.

``Trainer`` is imported on first use (PEP 562), so that importing the configuration or the
checkpoints (as the report and the inference module do) never imports the trainer."""

from typing import Any

from softtriple.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from softtriple.training.config import Config, ConfigError, load_config

__all__ = ["CheckpointError", "Config", "ConfigError", "Trainer", "load_checkpoint",
           "load_config", "save_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from softtriple.training.trainer import Trainer
        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
