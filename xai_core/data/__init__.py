"""Datasets: the built-in biased-shapes benchmark (METHODS §7), image folders with masks, Arrow schema."""

from xai_core.data.folders import ImageFolderWithMasks
from xai_core.data.synthetic import BiasedShapes

__all__ = ["BiasedShapes", "ImageFolderWithMasks"]
