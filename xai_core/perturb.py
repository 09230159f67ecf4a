"""Region-masked L-inf PGD / FGSM and background masks (METHODS §4).

x_adv = where(region, clamp(x + delta, 0, 1), x) with ||delta||_inf <= eps per sample: pixels outside
the region are the input's own values, bit for bit. Inputs are images in [0, 1]. Gradients are taken
only with respect to delta (``torch.autograd.grad``), so no ``.grad`` lands on the model's parameters,
and the model's train/eval mode is left as the caller set it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from xai_core._tensor import as_targets, check_images, check_unit_interval, norm01
from xai_core.attribution import explain

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MASK_SOURCES = ("cam", "ground_truth")


def per_sample(value: float | torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
    """A float or a tensor [B] (or 0-d) of finite values >= 0 as a [B,1,1,1] tensor on x's device/dtype."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device).detach()
    batch = x.shape[0]
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
        raise ValueError(f"{name} must be a float or a tensor of shape [{batch}] (one per sample), "
                         f"got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        bad = t.flatten()[(~torch.isfinite(t.flatten())) | (t.flatten() < 0)][0].item()
        raise ValueError(f"{name}={bad} is out of range: allowed values are finite and >= 0")
    return t.expand(batch).reshape(batch, 1, 1, 1)


def as_region(region: torch.Tensor | None, x: torch.Tensor, name: str = "region") -> torch.Tensor | None:
    """Validate a {0,1}/bool mask [B,1,H,W] or [B,H,W] matching x; return it as bool [B,1,H,W]."""
    if region is None:
        return None
    b, _, h, w = x.shape
    if not isinstance(region, torch.Tensor) or tuple(region.shape) not in ((b, 1, h, w), (b, h, w)):
        shape = tuple(region.shape) if isinstance(region, torch.Tensor) else type(region).__name__
        raise ValueError(f"{name} must have shape [{b},1,{h},{w}] or [{b},{h},{w}] to match x of shape "
                         f"{tuple(x.shape)}, got {shape}")
    if region.dtype != torch.bool:
        if not bool(((region == 0) | (region == 1)).all()):
            raise ValueError(f"{name} must be boolean or hold only 0 and 1, got values "
                             f"{torch.unique(region)[:5].tolist()}...")
        region = region != 0
    region = region.to(x.device)
    return region.unsqueeze(1) if region.dim() == 3 else region


def _apply(x0: torch.Tensor, delta: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    moved = (x0 + delta).clamp(0.0, 1.0)
    return moved if region is None else torch.where(region, moved, x0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, region: torch.Tensor | None = None,
        eps: float | torch.Tensor = 8 / 255, step_size: float | torch.Tensor = 2 / 255, steps: int = 5,
        random_start: bool = True, loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted L-inf PGD inside ``region`` (None: whole image); returns a detached x_adv. # METHODS §4

    Maximises ``loss_fn(logits, y)`` (default: cross-entropy of the true class; a per-sample loss is
    summed). ``eps`` and ``step_size`` are floats or per-sample tensors [B]. The random start is uniform
    in [-eps, eps] (drawn from ``generator`` if given). delta is projected after every step onto the
    feasible set: |delta| <= eps and x + delta in [0, 1].
    """
    check_images(x)
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"steps={steps!r} is out of range: allowed values are integers >= 1")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:  # normalised inputs would be silently clamped to [0, 1]
        raise ValueError(f"x must hold images in [0, 1] (put normalisation inside the model), got values "
                         f"in [{lo:.4g}, {hi:.4g}]")
    eps_t = per_sample(eps, "eps", x)
    step_t = per_sample(step_size, "step_size", x)
    m = as_region(region, x)
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, reduction="none"))
    x0 = x.detach()
    if random_start:
        dev = generator.device if generator is not None else x.device
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)
        delta = (2 * u - 1) * eps_t
    else:
        delta = torch.zeros_like(x0)

    def project(d: torch.Tensor) -> torch.Tensor:
        d = torch.maximum(torch.minimum(d, eps_t), -eps_t)
        return (x0 + d).clamp(0.0, 1.0) - x0

    delta = project(delta)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(_apply(x0, delta, m))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the model must return logits of shape [B,K] with B={x.shape[0]}, "
                                 f"got {shape}")
            t = as_targets(y, x.shape[0], logits.shape[1], x.device)
            loss = loss_fn(logits, t)
            (grad,) = torch.autograd.grad(loss.sum(), delta, allow_unused=True)
        if grad is None:  # the loss does not depend on the input: nothing to climb
            break
        delta = project(delta.detach() + step_t * grad.sign())
    return _apply(x0, delta, m).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, region: torch.Tensor | None = None,
         eps: float | torch.Tensor = 8 / 255, loss_fn: LossFn | None = None) -> torch.Tensor:
    """One signed-gradient step of size eps from x (PGD with steps=1, no random start). # METHODS §4"""
    return pgd(model, x, y, region=region, eps=eps, step_size=eps, steps=1, random_start=False,
               loss_fn=loss_fn)


def cam_background(cam01: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Background of a norm01'd CAM [B,H,W]: 1[cam < tau] as bool [B,1,H,W]. # METHODS §4

    A flat CAM (norm01 gives zeros: no localised evidence) makes the whole image background.
    """
    check_unit_interval(tau, "tau")
    return (cam01 < tau).unsqueeze(1)


def background_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, source: str = "cam",
                    object_mask: torch.Tensor | None = None, tau: float = 0.5,
                    layers: Sequence[str] | str | None = None) -> torch.Tensor:
    """The region a background attack may change, bool [B,1,H,W]. # METHODS §4

    source "ground_truth": ~object_mask (object_mask [B,H,W] required); "cam": 1[norm01(Grad-CAM) < tau]
    for the true class, at ``layers`` (None: the model's ``cam_layer``).
    """
    check_images(x)
    if source not in MASK_SOURCES:
        raise ValueError(f"unknown mask source {source!r}; allowed: {', '.join(MASK_SOURCES)}")
    if source == "ground_truth":
        if object_mask is None:
            raise ValueError("source='ground_truth' needs object_mask [B,H,W] (True on the object); "
                             "got None. Use source='cam' for data without masks")
        return ~as_region(object_mask, x, name="object_mask")
    check_unit_interval(tau, "tau")
    return cam_background(norm01(explain(model, x, y, method="gradcam", layers=layers)), tau)
