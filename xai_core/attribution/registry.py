"""``explain``: one entry point for every attribution method, keyed by the names of METHODS §1-3."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xai_core._tensor import check_images
from xai_core.attribution import cam, gradients
from xai_core.targets import PairMaps, Pairs, is_multilabel, label_pairs


@dataclass(frozen=True)
class Method:
    """How to run one method. kind: "input" (raw [B,C,H,W] + reduction), "cam", or "layered"
    (a method over layers that produces heatmaps itself, such as TIF and HAF)."""

    fn: Callable[..., torch.Tensor]
    kind: str
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    default_layers: str = "cam"  # "cam": [model.cam_layer]; "all": model.default_layers; "last2"
    # whether ``fn`` takes a Pairs target with these options (one forward for all classes of an image);
    # otherwise a multi-label call runs on the batch expanded to one row per (image, class) pair
    pairs: Callable[[dict], bool] = lambda _options: False


def always(_options: dict) -> bool:
    """A ``Method.pairs`` predicate: the method takes Pairs targets with any options."""
    return True


_METHODS: dict[str, Method] = {
    "saliency": Method(gradients.saliency, "input", gradients.reduce_abs_max, pairs=always),
    "input_x_gradient": Method(gradients.input_x_gradient, "input", gradients.reduce_sum_abs,
                               pairs=always),
    "integrated_gradients": Method(gradients.integrated_gradients, "input", gradients.reduce_sum_abs),
    "smoothgrad": Method(gradients.smoothgrad, "input", gradients.reduce_abs_max),
    "gradcam": Method(cam.CAM_WEIGHTS["gradcam"], "cam", pairs=always),
    "gradcam_pp": Method(cam.CAM_WEIGHTS["gradcam_pp"], "cam", pairs=always),
    "layercam": Method(cam.CAM_WEIGHTS["layercam"], "cam", pairs=always),
}


def register(name: str, method: Method) -> None:
    """Add a method to ``explain`` (used by tif.py and reliable.py; users may add their own)."""
    _METHODS[name] = method


def available_methods() -> list[str]:
    """The method names ``explain`` accepts."""
    return sorted(_METHODS)


def default_layers_for(model: nn.Module, which: str) -> list[str]:
    """The model's layer defaults: its ``cam_layer`` ("cam") or ``default_layers`` ("all"/"last2")."""
    layers = getattr(model, "default_layers", None)
    if which == "cam":
        cam_layer = getattr(model, "cam_layer", None) or (layers[-1] if layers else None)
        if cam_layer is None:
            raise ValueError(f"{type(model).__name__} has no `cam_layer`/`default_layers` attribute: "
                             "pass layers=[...] (module names as model.get_submodule takes them)")
        return [cam_layer]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no `default_layers` attribute: pass layers=[...]")
    return list(layers[-2:]) if which == "last2" else list(layers)


def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int | Sequence[Sequence[int]] | Pairs,
            method: str = "gradcam", *, layers: Sequence[str] | str | None = None,
            reduce: str | None = "default", create_graph: bool = False, upsample: bool = True,
            **options: object) -> torch.Tensor | PairMaps:
    """Heatmaps [B,H,W] of ``method`` for per-sample targets (or raw attributions with reduce=None).

    Input methods with ``reduce=None`` return raw [B,C,H,W]; CAM methods with ``upsample=False`` (or
    ``reduce=None``) return the single layer's map [B,h,w]. ``options`` go to the method
    (``n_steps``, ``internal_batch_size``, ``alpha``, ...); an unknown option raises ValueError.
    Methods over layers take token layers as they are: ViT [B,N,D] and Swin [B,h,w,D] outputs become
    [B,D,h,w] grids (leading class/register tokens dropped; ``_hooks.layer_grid``); ``reshape=`` (a
    callable [B,N,D] -> [B,D,h,w], or a mapping layer name -> callable) overrides the inferred grid.

    Multi-label: with ``target`` a multi-hot [B,K] tensor or a list of B class lists, the result is a
    ``PairMaps``: ``.maps`` [P,H,W], one per (image, class) pair, ``.image`` and ``.target`` [P] saying
    which (xai_core.targets). Gradient and CAM methods (and TIF on a one-pass base) run the B images
    once forward and once backward per label rank; the others run on the batch expanded to the P pairs.
    """
    check_images(x)
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(available_methods())}")
    if reduce not in ("default", None):
        raise ValueError(f"reduce={reduce!r} is not allowed: use 'default' (heatmap) or None (raw)")
    spec = _METHODS[method]
    run = dict(layers=layers, reduce=reduce, create_graph=create_graph, upsample=upsample, **options)
    if not is_multilabel(target):
        return _explain(model, x, target, method, **run)
    pairs = label_pairs(target, x.shape[0])
    if spec.pairs(options):
        return PairMaps(_explain(model, x, pairs, method, **run), pairs)
    return PairMaps(_explain(model, pairs.rows(x), pairs.target.to(x.device), method, **run), pairs)


def _explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int | Pairs, method: str, *,
             layers: Sequence[str] | str | None, reduce: str | None, create_graph: bool, upsample: bool,
             **options: object) -> torch.Tensor:
    spec = _METHODS[method]
    allowed = [p for p in inspect.signature(spec.fn).parameters
               if p not in ("model", "x", "target", "acts", "grads", "layers", "create_graph")]
    if spec.kind == "input":
        _check_options(method, options, allowed)
        if layers is not None:
            raise ValueError(f"method {method!r} attributes to the input and takes no layers "
                             f"(got layers={layers!r}); methods over layers: "
                             f"{', '.join(n for n, m in _METHODS.items() if m.kind != 'input')}")
        raw = spec.fn(model, x, target, create_graph=create_graph, **options)
        return raw if reduce is None else spec.reduce(raw)
    names = default_layers_for(model, spec.default_layers) if layers is None else (
        [layers] if isinstance(layers, str) else list(layers))
    if spec.kind == "cam":
        _check_options(method, options, ["normalize", "reshape"])
        return cam.cam_maps(model, x, target, names, spec.fn, create_graph=create_graph,
                            upsample_maps=upsample and reduce is not None, normalize=options.get("normalize", True),
                            reshape=options.get("reshape"))
    _check_options(method, options, allowed + ["upsample"])
    return spec.fn(model, x, target, layers=names, create_graph=create_graph, upsample=upsample,
                   **options)


def _check_options(method: str, options: dict, allowed: list[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; "
                         f"allowed: {', '.join(sorted(allowed)) or '(none)'}")
