"""Sanity check by cascading model randomisation, scored with Spearman rank correlation (METHODS §6)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from xai_core._tensor import check_maps, check_same_shape, stable_argsort

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def average_ranks(a: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based, float64) along the last dim of [B,N]; tied values share their average rank."""
    # A float sorts in the same order as its float64 value: sorted as it is (stable_argsort picks the path).
    perm = stable_argsort(a if a.is_floating_point() else a.double())
    vals = a.double().gather(1, perm)
    b, n = vals.shape
    new_group = torch.ones_like(vals, dtype=torch.bool)
    new_group[:, 1:] = vals[:, 1:] != vals[:, :-1]
    gid = new_group.long().cumsum(1) - 1  # group index of each sorted position
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=a.device).expand(b, n)
    sums = torch.zeros(b, n, dtype=torch.float64, device=a.device).scatter_add_(1, gid, pos)
    cnts = torch.zeros(b, n, dtype=torch.float64, device=a.device).scatter_add_(1, gid, torch.ones_like(pos))
    avg_sorted = (sums / cnts.clamp_min(1)).gather(1, gid)
    return torch.empty_like(avg_sorted).scatter_(1, perm, avg_sorted)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation [B] between a[i] and b[i] flattened ([B,...] each), average ranks on ties.

    The correlation with a constant sample is undefined: NaN (as scipy.stats.spearmanr).
    """
    check_same_shape(a, b, "a", "b")
    if a.dim() < 2:
        raise ValueError(f"a and b must be batches [B,...] of samples, got shape {tuple(a.shape)}")
    return _rank_corr(_centred_ranks(a), _centred_ranks(b.to(a.device)), a.dtype)


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """bool [B]: True where maps[i] ([B,...]) holds one value everywhere (its rank correlations are NaN)."""
    flat = maps.flatten(1)
    return (flat == flat[:, :1]).all(1)


def _centred_ranks(a: torch.Tensor) -> torch.Tensor:
    """Average ranks of each flattened sample of a [B,...], minus their mean (float64 [B,N])."""
    r = average_ranks(a.flatten(1))
    return r - r.mean(1, keepdim=True)


def _rank_corr(ra: torch.Tensor, rb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pearson correlation [B] of centred ranks; NaN where a sample is constant; in ``dtype`` if floating."""
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    r = (ra * rb).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where(den > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))
    return r.to(dtype if dtype.is_floating_point else torch.float32)


def _default_layer_order(model: nn.Module) -> list[str]:
    names = [n for n, child in model.named_children() if any(True for _ in child.parameters())]
    return names[::-1]


def _reinit(module: nn.Module, name: str, seed: int) -> None:
    """Re-initialise every submodule of ``module`` that has reset_parameters, seeded, RNG state restored."""
    devs = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    covered: set[int] = set()
    with torch.random.fork_rng(devices=devs):
        torch.random.default_generator.manual_seed(seed)
        if devs:
            torch.cuda.manual_seed_all(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in sub.parameters())
    missed = [n for n, p in module.named_parameters() if id(p) not in covered]
    if missed:
        warnings.warn(f"model_randomisation: parameters of layer {name!r} without reset_parameters() "
                      f"stay as trained: {missed}", stacklevel=3)


def model_randomisation(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, explain_fn: ExplainFn,
                        layer_order: Sequence[str] | None = None, seed: int = 0,
                        constant: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Cascading model randomisation: {layer: Spearman [B]} of the trained map vs the randomised one.

    A deep copy of the model is randomised (the caller's model is never touched), layer after layer in
    ``layer_order`` (names from the output towards the input; default: the named children that have
    parameters, reversed), each via reset_parameters() of its submodules seeded with seed + step. After
    each step ``explain_fn(model_copy, x, target) -> [B,H,W]`` is recomputed and compared with the map of
    the untouched copy. A reliable method decorrelates. METHODS §6

    A constant map (e.g. a learned mask that collapsed to empty) has no ranks: its Spearman is NaN. Pass a
    dict as ``constant`` to learn which: it is filled with ``{"trained": bool [B], layer: bool [B], ...}``,
    True where the trained map, or the map after that layer's step, is constant.
    """
    if isinstance(layer_order, str):
        raise ValueError(f"layer_order={layer_order!r} must be a list of module names, not a string")
    order = _default_layer_order(model) if layer_order is None else list(layer_order)
    allowed = {n for n, _ in model.named_modules() if n}
    bad = [n for n in order if n not in allowed]
    if bad:
        raise ValueError(f"layer_order names unknown modules {bad}; allowed: {sorted(allowed)}")
    if not order:
        raise ValueError("layer_order is empty: the model has no child module with parameters to randomise")
    work = copy.deepcopy(model)
    original = explain_fn(work, x, target)
    check_maps(original, "explain_fn output")
    original = original.detach()
    if constant is not None:
        constant["trained"] = constant_maps(original)
    ranks = _centred_ranks(original)  # ranked once, compared with every step's map
    out: dict[str, torch.Tensor] = {}
    for step, name in enumerate(order):
        _reinit(work.get_submodule(name), name, seed + step)
        randomised = explain_fn(work, x, target)
        check_same_shape(randomised, original, "randomised map", "original map")
        if constant is not None:
            constant[name] = constant_maps(randomised.detach())
        out[name] = _rank_corr(ranks, _centred_ranks(randomised.detach().to(original.device)), original.dtype)
    return out


__all__ = ["average_ranks", "constant_maps", "model_randomisation", "spearman"]
