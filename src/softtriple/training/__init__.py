"""Training: the trainer (the loop over epochs that calls the experiment's builders) and the
head protocol's feature cache. Only the commands that train (cli, demo, compare) import it."""

from softtriple.training.trainer import Trainer

__all__ = ["Trainer"]
