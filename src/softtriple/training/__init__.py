"""Training: configuration, the trainer, checkpoints and multi-process support."""

from softtriple.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from softtriple.training.config import Config, ConfigError, load_config
from softtriple.training.trainer import Trainer, model_from_checkpoint

__all__ = ["CheckpointError", "Config", "ConfigError", "Trainer", "load_checkpoint",
           "load_config", "model_from_checkpoint", "save_checkpoint"]
