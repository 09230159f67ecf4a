"""D-WSOL: disturbed weakly-supervised object localisation (METHODS §3a).

Images hold an object of class a and a distractor of class b, with a mask for each. For a method given
as ``explain_fn(model, x, target) -> [B,H,W]``:
- hit_a: the map for query a points (pointing game, METHODS §6) into object a and its maximum is not
  inside object b; hit_b likewise with a and b swapped;
- false_response: for an absent class c, the relu mass of the map for c inside (mask_a | mask_b),
  divided by the total relu mass of the map for a (lower is better);
- accuracy = (hit_a + hit_b) / 2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xai_core._tensor import check_maps, check_same_shape
from xai_core.metrics.localisation import pointing_game

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def default_absent(label_a: torch.Tensor, label_b: torch.Tensor) -> torch.Tensor:
    """Per sample, the smallest class index not in {a, b} (always one of 0, 1, 2)."""
    cand = torch.arange(3, device=label_a.device).expand(label_a.shape[0], 3)
    free = (cand != label_a[:, None]) & (cand != label_b[:, None])
    return cand.gather(1, free.long().argmax(1, keepdim=True)).squeeze(1)


def _argmax_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Whether each map's argmax pixel (first on ties, row-major, as in pointing_game) lies in the mask."""
    idx = maps.flatten(1).argmax(1, keepdim=True)
    return masks.flatten(1).gather(1, idx).squeeze(1)


def false_response(map_c: torch.Tensor, map_a: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """sum relu(map_c) inside ``objects`` / sum relu(map_a) [B]. METHODS §3a

    0 where map_c has no positive mass inside the objects (whatever map_a is); NaN ("undefined") where
    it has some but map_a has no positive mass at all.
    """
    check_maps(map_c, "map_c")
    check_same_shape(map_c, map_a, "map_c", "map_a")
    check_same_shape(map_c, objects, "map_c", "objects")
    num = (map_c.clamp_min(0) * objects.to(map_c.dtype)).flatten(1).sum(1)
    den = map_a.clamp_min(0).flatten(1).sum(1).to(num.dtype)
    ratio = num / torch.where(den > 0, den, torch.ones_like(den))
    ratio = torch.where(den > 0, ratio, torch.full_like(ratio, float("nan")))
    return torch.where(num > 0, ratio, torch.zeros_like(ratio))


def _labels(v: torch.Tensor | int, b: int, name: str, device: torch.device) -> torch.Tensor:
    t = torch.full((b,), v, dtype=torch.long) if isinstance(v, int) else torch.as_tensor(v)
    if t.dtype.is_floating_point or t.dtype == torch.bool or tuple(t.shape) != (b,):
        raise ValueError(f"{name} must be an int or an integer tensor of shape [{b}], "
                         f"got shape {tuple(t.shape)} and dtype {t.dtype}")
    return t.long().to(device)


def dwsol(model: nn.Module, x: torch.Tensor, label_a: torch.Tensor, label_b: torch.Tensor,
          mask_a: torch.Tensor, mask_b: torch.Tensor, explain_fn: ExplainFn, *,
          absent: torch.Tensor | None = None, tolerance: float | None = None) -> dict[str, torch.Tensor]:
    """D-WSOL per sample: {"hit_a", "hit_b", "false_response", "accuracy"}, each [B]. METHODS §3a

    ``absent`` [B] is the class queried for the false response (default: the smallest class not in
    {a, b}; it must differ from both). A hit is 1.0 when the map's argmax lies within ``tolerance``
    pixels of its own object's mask (see ``pointing_game``) and not inside the other object's mask;
    an empty own mask gives NaN. ``explain_fn`` is called three times (queries a, b and c).
    """
    b = x.shape[0]
    la = _labels(label_a, b, "label_a", x.device)
    lb = _labels(label_b, b, "label_b", x.device)
    if bool((la == lb).any()):
        raise ValueError("label_a and label_b must differ in every sample (two objects of different classes)")
    c = default_absent(la, lb) if absent is None else _labels(absent, b, "absent", x.device)
    if bool(((c == la) | (c == lb)).any()):
        raise ValueError("absent must differ from label_a and label_b in every sample")
    shape = (b, x.shape[-2], x.shape[-1])
    for name, m in (("mask_a", mask_a), ("mask_b", mask_b)):
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != shape:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name} must have shape {list(shape)} to match x, got {got}")
    ma, mb = mask_a.to(x.device).bool(), mask_b.to(x.device).bool()
    maps = {}
    for key, t in (("a", la), ("b", lb), ("c", c)):
        m = explain_fn(model, x, t)
        check_maps(m, f"explain_fn output for query {key}")
        if tuple(m.shape) != shape:
            raise ValueError(f"explain_fn must return maps of shape {list(shape)}, got {tuple(m.shape)}")
        maps[key] = m.detach()
    hit_a = pointing_game(maps["a"], ma, tolerance) * (~_argmax_inside(maps["a"], mb)).to(maps["a"].dtype)
    hit_b = pointing_game(maps["b"], mb, tolerance) * (~_argmax_inside(maps["b"], ma)).to(maps["b"].dtype)
    return {"hit_a": hit_a, "hit_b": hit_b, "false_response": false_response(maps["c"], maps["a"], ma | mb),
            "accuracy": (hit_a + hit_b) / 2}


__all__ = ["default_absent", "dwsol", "false_response"]
