"""Explanation-consistency reweighting (METHODS §5a).

E_i = similarity of norm01(Grad-CAM(x_i, y_i)) and norm01(Grad-CAM(x_adv_i, y_i)), x_adv from a
background-only PGD (METHODS §4); raw weight v_i = 1 - E_i; normalised weights w over the whole dataset.
Maps are computed without ``create_graph`` and the model's train/eval mode is left as the caller set it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xai_core._tensor import as_targets, check_images, norm01
from xai_core.attribution import explain
from xai_core.perturb import MASK_SOURCES, background_mask, cam_background, pgd

SIMILARITIES = ("cosine", "pearson", "js")
# what a sample whose clean or adversarial Grad-CAM is flat (no localised evidence) gets (METHODS §5a):
# "legacy": as the first version computed it (a flat clean map makes the whole image background and is
# attacked there; its weight is what the similarity gives); "keep": its similarity weight, but a flat clean
# map is not attacked (no background to find); "one": weight 1; "exclude": weight 0
DEGENERATE = ("legacy", "keep", "one", "exclude")


@dataclass
class ConsistencyResult:
    """Per-sample outputs, all detached: E [B], v = 1 - E [B], background bool [B,1,H,W], x_adv
    [B,C,H,W], cam and cam_adv (norm01'd Grad-CAM of the true class) [B,H,W], w [B] once normalised."""

    E: torch.Tensor
    v: torch.Tensor
    background: torch.Tensor
    x_adv: torch.Tensor
    cam: torch.Tensor
    cam_adv: torch.Tensor
    w: torch.Tensor | None = None
    degenerate: torch.Tensor | None = None  # [B] bool: the clean or the adversarial map is flat


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; allowed: {'|'.join(SIMILARITIES)}")


def map_similarity(a: torch.Tensor, b: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """Similarity in [0, 1] of non-negative maps [B,...] flattened per sample. # METHODS §5a

    Identical maps give exactly 1 with every measure. Otherwise:
    - "cosine": <a,b> / (|a| |b|); one all-zero map -> 0.
    - "pearson": (r + 1) / 2; a constant map (r undefined) -> 0.5 (no linear relation).
    - "js": 1 - JS(a/sum a, b/sum b) with log base 2 (JS in [0, 1]); one all-zero map -> 0.
    """
    _check_similarity(similarity)
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    a, b = a.flatten(1).double(), b.flatten(1).double()
    if similarity == "cosine":
        na, nb = a.norm(dim=1), b.norm(dim=1)
        s = (a * b).sum(1) / (na * nb).clamp_min(torch.finfo(a.dtype).tiny)
    elif similarity == "pearson":
        ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        den = ac.norm(dim=1) * bc.norm(dim=1)
        r = torch.where(den > 0, (ac * bc).sum(1) / den.clamp_min(torch.finfo(a.dtype).tiny),
                        torch.zeros_like(den))
        s = (r + 1) / 2
    else:
        sa, sb = a.sum(1, keepdim=True), b.sum(1, keepdim=True)
        p, q = a / sa.clamp_min(torch.finfo(a.dtype).tiny), b / sb.clamp_min(torch.finfo(a.dtype).tiny)
        mid = (p + q) / 2

        def kl(u: torch.Tensor) -> torch.Tensor:  # KL(u || mid) in bits, 0 log 0 = 0
            return torch.where(u > 0, u * torch.log2(u / mid.clamp_min(torch.finfo(a.dtype).tiny)),
                               torch.zeros_like(u)).sum(1)

        js = (kl(p) + kl(q)) / 2
        s = torch.where((sa.squeeze(1) > 0) & (sb.squeeze(1) > 0), 1 - js, torch.zeros_like(js))
    s = torch.where((a == b).all(1), torch.ones_like(s), s.clamp(0.0, 1.0))
    return s.to(dtype)


def explanation_consistency(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, *,
                            mask_source: str = "cam", object_mask: torch.Tensor | None = None,
                            tau: float = 0.5, eps: float | torch.Tensor = 8 / 255,
                            step_size: float | torch.Tensor = 2 / 255, steps: int = 5,
                            similarity: str = "cosine", layers: Sequence[str] | str | None = None,
                            generator: torch.Generator | None = None,
                            degenerate: str = "legacy") -> ConsistencyResult:
    """E and v = 1 - E per sample: Grad-CAM consistency under a background-only attack. # METHODS §5a

    ``degenerate`` (DEGENERATE): with anything but "legacy" a sample whose clean map is flat gets no attack
    (its background would be the whole image); ``result.degenerate`` flags the samples whose clean or
    adversarial map is flat in every case, and ``degenerate_weights`` applies the rest of the choice."""
    check_images(x)
    _check_similarity(similarity)
    if degenerate not in DEGENERATE:
        raise ValueError(f"degenerate={degenerate!r}: allowed values are {', '.join(DEGENERATE)}")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"unknown mask_source {mask_source!r}; allowed: {', '.join(MASK_SOURCES)}")
    t = as_targets(y, x.shape[0], None, x.device)
    cam = norm01(explain(model, x, t, method="gradcam", layers=layers))
    if mask_source == "cam":  # reuse the map computed above instead of a second Grad-CAM pass
        background = cam_background(cam, tau)
    else:
        background = background_mask(model, x, t, source=mask_source, object_mask=object_mask)
    flat = ~(cam.flatten(1).amax(1) > 0)  # norm01 of a constant map is all zero
    if degenerate != "legacy" and mask_source == "cam":
        background = background & ~flat.view(-1, 1, 1, 1)
    x_adv = pgd(model, x, t, region=background, eps=eps, step_size=step_size, steps=steps,
                generator=generator)
    cam_adv = norm01(explain(model, x_adv, t, method="gradcam", layers=layers))
    e = map_similarity(cam, cam_adv, similarity)
    return ConsistencyResult(E=e, v=1 - e, background=background, x_adv=x_adv, cam=cam.detach(),
                             cam_adv=cam_adv.detach(), degenerate=flat | ~(cam_adv.flatten(1).amax(1) > 0))


def degenerate_weights(v: torch.Tensor, degenerate: torch.Tensor, how: str = "legacy", power: float = 1.0,
                       w_min: float = 0.1, w_max: float | None = None) -> torch.Tensor:
    """Mean-1 weights of a whole dataset with its flagged samples handled by ``how`` (DEGENERATE): "legacy"
    and "keep": ``normalise_weights`` of every v; "one": the others normalised among themselves, the
    flagged ones 1; "exclude": the flagged ones 0, the others normalised so that the mean over all is 1."""
    if how not in DEGENERATE:
        raise ValueError(f"degenerate={how!r}: allowed values are {', '.join(DEGENERATE)}")
    v = torch.as_tensor(v)
    flag = torch.as_tensor(degenerate, dtype=torch.bool, device=v.device)
    if tuple(flag.shape) != tuple(v.shape):
        raise ValueError(f"degenerate flags {tuple(flag.shape)} must match v {tuple(v.shape)}")
    kw = {"power": power, "w_min": w_min, "w_max": w_max}
    if how in ("legacy", "keep") or not bool(flag.any()):
        return normalise_weights(v, **kw)
    w = torch.ones_like(v, dtype=v.dtype if v.is_floating_point() else torch.get_default_dtype())
    if bool((~flag).any()):
        w[~flag] = normalise_weights(v[~flag], **kw).to(w.dtype)
    if how == "exclude":
        w[flag] = 0
        w = w * (len(w) / w.sum()) if bool(w.sum() > 0) else w
    return w


def normalise_weights(v: torch.Tensor, power: float = 1.0, w_min: float = 0.1,
                      w_max: float | None = None) -> torch.Tensor:
    """w proportional to v**power, scaled to mean 1, floored at w_min, rescaled to mean 1. # METHODS §5a

    Apply it to the raw weights of the WHOLE dataset (the mean is over v). If every v is 0 (every
    explanation survived the attack unchanged) there is nothing to prefer: all ones (plain training).
    After the final rescaling a floored weight is w_min / mean(floored w), slightly below w_min.
    ``w_max`` (an extension, not in the paper) caps the largest weights: the weights above it are set to
    w_max and the rest scaled so that the mean stays 1 (exactly; needs w_max >= 1). A handful of samples
    whose map vanished under the attack can otherwise carry 50x the mean weight and dominate a batch.
    """
    v = torch.as_tensor(v)
    dtype = v.dtype if v.is_floating_point() else torch.get_default_dtype()
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"v must be a non-empty 1-D tensor of raw weights, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        bad = v[~torch.isfinite(v) | (v < 0)][0].item()
        raise ValueError(f"raw weight {bad} is out of range: allowed values are finite and >= 0")
    if not power >= 0:
        raise ValueError(f"power={power} is out of range: allowed values are >= 0")
    if not 0 <= w_min <= 1:
        raise ValueError(f"w_min={w_min} is out of range: allowed values are in [0, 1]")
    u = v.double() ** power
    if not bool((u > 0).any()):
        return torch.ones(v.shape, dtype=dtype, device=v.device)
    if w_max is not None and not w_max >= 1:
        raise ValueError(f"w_max={w_max} is out of range: allowed values are >= 1 (the mean weight is 1)")
    w = (u / u.mean()).clamp_min(w_min)
    w = w / w.mean()
    if w_max is not None:
        w = _cap(w, w_max)
    return w.to(dtype)


def _cap(w: torch.Tensor, w_max: float) -> torch.Tensor:
    """Mean-1 weights with none above w_max: capped ones at w_max, the others scaled by one factor."""
    capped = torch.zeros_like(w, dtype=torch.bool)
    n = w.numel()
    for _ in range(n):  # each pass caps at least one more weight or stops
        free = ~capped
        if not bool(free.any()):
            break
        scale = (n - w_max * capped.sum()) / w[free].sum()
        new = free & (w * scale > w_max)
        if not bool(new.any()):
            return torch.where(capped, torch.full_like(w, w_max), w * scale)
        capped |= new
    return torch.full_like(w, w_max)


def consistency_weights(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, *,
                        power: float = 1.0, w_min: float = 0.1, w_max: float | None = None,
                        **kwargs: object) -> ConsistencyResult:
    """explanation_consistency + normalise_weights over this batch (the pipeline normalises over the
    whole dataset instead). ``kwargs`` are those of ``explanation_consistency``. # METHODS §5a"""
    res = explanation_consistency(model, x, y, **kwargs)
    res.w = normalise_weights(res.v, power=power, w_min=w_min, w_max=w_max)
    return res


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean_i w_i * CE(logits_i, y_i), a scalar. # METHODS §5a"""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B,K], got {tuple(logits.shape)}")
    w = torch.as_tensor(w, dtype=logits.dtype, device=logits.device)
    if tuple(w.shape) != (logits.shape[0],):
        raise ValueError(f"w must have shape [{logits.shape[0]}] (one weight per sample), "
                         f"got {tuple(w.shape)}")
    t = as_targets(y, logits.shape[0], logits.shape[1], logits.device)
    return (w * F.cross_entropy(logits, t, reduction="none")).mean()
