"""Models: backbones (BACKBONES registry) and the embedding model."""

from softtriple.models.backbones import BACKBONES, Backbone, WeightsError, build_backbone
from softtriple.models.embedding import EmbeddingModel, embed

__all__ = ["BACKBONES", "Backbone", "EmbeddingModel", "WeightsError", "build_backbone", "embed"]
