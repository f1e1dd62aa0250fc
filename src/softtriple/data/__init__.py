"""Data: on-disk formats -> ImageTable (path, label, split) -> Dataset + transforms."""

from softtriple.data.dataset import ImageDataset, load_image, verify_images
from softtriple.data.formats import FORMATS, read_table
from softtriple.data.samplers import ClassBalancedBatchSampler, ShardedBatchSampler
from softtriple.data.table import DataError, ImageTable
from softtriple.data.transforms import eval_transform, normalize_images, train_transform

__all__ = [
    "FORMATS",
    "ClassBalancedBatchSampler",
    "DataError",
    "ImageDataset",
    "ImageTable",
    "ShardedBatchSampler",
    "eval_transform",
    "load_image",
    "normalize_images",
    "read_table",
    "train_transform",
    "verify_images",
]
