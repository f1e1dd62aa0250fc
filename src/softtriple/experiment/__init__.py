"""What every command shares about a run, below the trainer and inference (which sit side by
side on it): the config schema and its validation (config.py), the builders of device, model,
loss and optimizer from a config (build.py), the checkpoint format (checkpoint.py), the data
loaders a config describes (loaders.py) and the run folder (run_folder.py)."""

from softtriple.experiment.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from softtriple.experiment.config import Config, ConfigError, load_config

__all__ = ["CheckpointError", "Config", "ConfigError", "load_checkpoint", "load_config",
           "save_checkpoint"]
