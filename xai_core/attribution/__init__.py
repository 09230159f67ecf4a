"""Attribution methods (METHODS §1-3) behind one entry point, ``explain``."""

from xai_core.attribution import reliable as _reliable  # noqa: F401  (registers "haf")
from xai_core.attribution import tif as _tif  # noqa: F401  (registers "tif", "gradcam_thresholded")
from xai_core.attribution._hooks import LayerMaps, capture, layer_maps
from xai_core.attribution.registry import Method, available_methods, explain, register

__all__ = ["LayerMaps", "Method", "available_methods", "capture", "explain", "layer_maps", "register"]
