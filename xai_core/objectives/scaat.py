"""SCAAT: saliency-constrained adaptive adversarial training loss (METHODS §5b).

Per batch: saliency S = |dy/dx| max over channels (true class); region = the ``keep`` fraction of
pixels with the lowest S; budget eps_i = eps * (1 - p_i(y_i)) + eps_min; x_adv = PGD inside the region
(METHODS §4); loss = CE(f(x), y) + lam * KL(p(x) || p(x_adv)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from xai_core._tensor import check_images, stable_argsort
from xai_core.attribution import layer_maps
from xai_core.attribution.gradients import reduce_abs_max
from xai_core.perturb import pgd

ATTACK_MODES = ("eval", "current")
# where the attack may act: SCAAT's low-saliency region, or the controls of METHODS §5b: the whole image, or
# a random set of pixels of the same size as the low-saliency region (same eps_i, steps, loss)
REGIONS = ("saliency", "whole", "random")


@dataclass
class ScaatResult:
    """loss: scalar with graph (backward it); ce, kl: detached scalars; per sample: region bool
    [B,1,H,W] (where the attack may act), eps_i [B], x_adv [B,C,H,W], saliency [B,H,W], logits [B,K]."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    region: torch.Tensor
    eps_i: torch.Tensor
    x_adv: torch.Tensor
    saliency: torch.Tensor
    logits: torch.Tensor | None = None  # clean logits f(x), detached (for accuracy bookkeeping)


@contextmanager
def attack_mode_context(model: nn.Module, mode: str) -> Iterator[None]:
    """Mode "eval": the model in eval() inside the block, each module's own mode restored in ``finally``
    (attack forwards must not update BatchNorm statistics); "current": the mode is left alone."""
    if mode not in ATTACK_MODES:
        raise ValueError(f"unknown attack_mode {mode!r}; allowed: {', '.join(ATTACK_MODES)}")
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def low_saliency_region(saliency: torch.Tensor, keep: float) -> torch.Tensor:
    """The round(keep * H * W) pixels of lowest saliency per sample, bool [B,1,H,W]. # METHODS §5b

    Without ties this is S < torch.quantile(S, keep) (to one pixel of rounding); ranking (stable,
    by pixel index among ties) keeps the fraction also when many pixels tie, e.g. at zero saliency,
    where the strict quantile rule would select none of them.
    """
    flat = saliency.flatten(1)
    k = int(math.floor(keep * flat.shape[1] + 0.5))
    order = stable_argsort(flat)
    region = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    region.scatter_(1, order[:, :k], True)
    return region.view(saliency.shape).unsqueeze(1)


def random_region(shape: tuple[int, ...], keep: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """round(keep * H * W) pixels per sample drawn uniformly without replacement, bool [B,1,H,W]: the
    random-region control's mask, as many pixels as ``low_saliency_region`` selects."""
    b, h, w = shape
    k = int(math.floor(keep * h * w + 0.5))
    noise = torch.rand(b, h * w, generator=generator, device=generator.device if generator is not None else device)
    region = torch.zeros(b, h * w, dtype=torch.bool, device=noise.device)
    region.scatter_(1, noise.argsort(1)[:, :k], True)
    return region.view(b, 1, h, w).to(device)


def _check_nonneg(value: float, name: str) -> None:
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name}={value} is out of range: allowed values are finite and >= 0")


def scaat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, *, keep: float = 0.5,
               eps: float = 8 / 255, eps_min: float = 1 / 255, steps: int = 3,
               step_size: float | torch.Tensor | None = None, lam: float = 1.0,
               attack_mode: str = "eval", generator: torch.Generator | None = None,
               region: str = "saliency") -> ScaatResult:
    """The SCAAT training loss for one batch. # METHODS §5b

    ``step_size`` None: 2.5 * eps_i / steps per sample. ``attack_mode="eval"`` runs the saliency pass
    and the attack with the model in eval() and restores every module's mode afterwards;
    "current" leaves it alone. The two loss forwards (x, then x_adv) run in the caller's mode.
    ``region``: "saliency" (SCAAT), or the controls "whole" (every pixel) and "random" (``random_region``
    of the same size, drawn from ``generator``); eps_i, the attack and the loss are the same in all three.
    """
    check_images(x)
    if region not in REGIONS:
        raise ValueError(f"region={region!r}: allowed values are {', '.join(REGIONS)}")
    if not 0 < keep < 1:
        raise ValueError(f"keep={keep} is out of range: allowed values are in (0, 1)")
    _check_nonneg(eps, "eps")
    _check_nonneg(eps_min, "eps_min")
    _check_nonneg(lam, "lam")
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ValueError(f"steps={steps!r} is out of range: allowed values are integers >= 1")
    with attack_mode_context(model, attack_mode):
        lm = layer_maps(model, x, y, input_grad=True)  # == explain(..., method="saliency") + its logits
        t = lm.target
        sal = reduce_abs_max(lm.input_grad)
        if region == "saliency":
            where = low_saliency_region(sal, keep)
        elif region == "whole":
            where = torch.ones_like(sal, dtype=torch.bool).unsqueeze(1)
        else:
            where = random_region(tuple(sal.shape), keep, generator, device=sal.device)
        conf = lm.logits.softmax(1).gather(1, t[:, None]).squeeze(1)
        eps_i = eps * (1 - conf) + eps_min
        step = 2.5 * eps_i / steps if step_size is None else step_size
        x_adv = pgd(model, x, t, region=where, eps=eps_i, step_size=step, steps=steps,
                    generator=generator)
    logits = model(x)
    logits_adv = model(x_adv)
    ce = F.cross_entropy(logits, t)
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits, 1), reduction="batchmean",
                  log_target=True)
    loss = ce + lam * kl
    return ScaatResult(loss=loss, ce=ce.detach(), kl=kl.detach(), region=where, eps_i=eps_i,
                       x_adv=x_adv, saliency=sal, logits=logits.detach())
