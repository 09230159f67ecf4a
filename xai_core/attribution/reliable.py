"""Reliable saliency: learned feature masks and the HAF map (METHODS §3).

Per sample and per layer l a mask M_l >= 0 of the activation's shape [K_l,h_l,w_l] multiplies the
layer's output in the forward. For a query class c (any class, also a wrong one) the masks minimise

    P_c(M) + lam * sum_l ||M_l||_1 / sqrt(h_l w_l)

with Adam from M = 1, projected to M >= 0 after each step. The preservation term P_c has two readings
(``preserve``, METHODS §3): "two_sided" (default) (f_c(x; M) - f_c(x))^2, the masked score stays close;
"one_sided" relu(f_c(x) - f_c(x; M))^2, the masked score may rise but not fall, so features that only
argue against c (the present object, for an absent c) need not be kept. The whole batch is optimised jointly (the
summed loss has per-sample gradients and Adam is element-wise, so this equals separate runs).
HAF = sum_l norm01(upsample(mean over channels of M_l)) / L; ``normalize=False`` leaves out the per-layer
norm01 (sum_l upsample(mean_k M_l) / L): the raw masks, for comparing the maps of several query classes
of one image on one scale (a near-empty mask must stay near empty).

Which iterate is kept (``keep``; candidates: the masks before each update and after the last one):
- "loss" (default): per sample, the lowest full objective. METHODS §3 says "the lowest preservation
  term", but read literally that is always the starting M = 1 (preservation exactly 0): flat masks and
  an all-zero HAF map. The lowest objective keeps the spirit (the best masks found) without that trap.
- "preservation": the literal reading (returns M = 1 whenever step 0 is a candidate, i.e. always).
- "last": the masks after the last update.
Scale note: with lam = 1 the sparsity term (K_l sqrt(h_l w_l) at M = 1) dwarfs the squared logit
error of small models, and most mask entries end at 0; lower lam keeps more.

The model runs in eval mode during the optimisation (BatchNorm uses and keeps its running statistics);
every module's training flag is restored afterwards. Only the masks get gradients (via
``torch.autograd.grad``): parameters are never changed and get no ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from xai_core._tensor import as_targets, check_images, norm01
from xai_core._tensor import upsample as _upsample
from xai_core.attribution._hooks import ReshapeArg, capture, on_grids, resolve_layers
from xai_core.attribution.registry import Method, register

KEEP = ("loss", "preservation", "last")  # which iterate ``learn_masks`` returns, per sample
PRESERVE = ("two_sided", "one_sided")  # the readings of the preservation term


def _preservation(out: torch.Tensor, ref: torch.Tensor, preserve: str) -> torch.Tensor:
    """P_c per sample [B]: (out - ref)^2, or relu(ref - out)^2 when one-sided."""
    return (out - ref) ** 2 if preserve == "two_sided" else (ref - out).clamp_min(0) ** 2


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own training flag in ``finally``."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value} is not allowed: use a finite number {bound}")


def _sparsity(masks: dict[str, torch.Tensor], scale: dict[str, float]) -> torch.Tensor:
    """sum_l ||M_l||_1 / sqrt(h_l w_l) per sample [B]."""
    return sum(m.abs().flatten(1).sum(1) * scale[n] for n, m in masks.items())


def learn_masks(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *, layers: Sequence[str],
                steps: int = 30, lr: float = 0.05, lam: float = 1.0, keep: str = "loss",
                preserve: str = "two_sided", trace: list[torch.Tensor] | None = None,
                reshape: ReshapeArg = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Learn masks per layer for query class ``target``; returns (masks {name: [B,K,h,w]}, preservation [B]).

    ``preservation`` is P_c at the kept masks (``preserve``: see the module docstring). ``steps`` Adam
    updates are made and the objective is evaluated before each update and once after the last (steps + 1
    candidates); ``keep`` picks one per sample (see the module docstring). ``trace``, a list, receives the
    objective P_c + lam * sparsity [B] at each of the steps + 1 evaluations: the curve that says whether
    ``steps`` and ``lr`` converge. Token layers are masked on their patch grid ([B,D,h,w], ``layer_grid``;
    ``reshape``), leading class/register tokens untouched. METHODS §3
    """
    check_images(x)
    names = resolve_layers(model, layers)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is not allowed: use an integer >= 0")
    _check_positive(float(lr), "lr")
    _check_positive(float(lam), "lam", allow_zero=True)
    if keep not in KEEP:
        raise ValueError(f"keep={keep!r} is not allowed: use one of {', '.join(KEEP)}")
    if preserve not in PRESERVE:
        raise ValueError(f"preserve={preserve!r} is not allowed: use one of {', '.join(PRESERVE)}")
    x = x.detach()
    with _eval_mode(model):
        with torch.no_grad(), capture(model, names, reshape) as acts:
            logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the model must return logits of shape [B,K] with B={x.shape[0]}, got {shape}")
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(f"layers {missing} were not called in the forward pass of "
                             f"{type(model).__name__}; choose layers on the path to the output")
        t = as_targets(target, x.shape[0], logits.shape[1], x.device)
        ref = logits.gather(1, t[:, None]).squeeze(1)
        masks = {n: torch.ones_like(acts[n], dtype=ref.dtype).requires_grad_(True) for n in names}
        scale = {n: 1.0 / math.sqrt(acts[n].shape[-2] * acts[n].shape[-1]) if acts[n].dim() == 4 else 1.0
                 for n in names}
        del acts, logits
        best = {n: m.detach().clone() for n, m in masks.items()}
        best_pres = torch.full_like(ref, float("inf"))
        best_score = torch.full_like(ref, float("inf"))
        opt = torch.optim.Adam(list(masks.values()), lr=lr)

        def keep_best(pres: torch.Tensor, sparsity: torch.Tensor) -> None:
            if trace is not None:
                trace.append((pres + lam * sparsity).detach().clone())
            score = pres + lam * sparsity if keep == "loss" else pres
            better = torch.ones_like(pres, dtype=torch.bool) if keep == "last" else score < best_score
            best_score.copy_(torch.where(better, score, best_score))
            best_pres.copy_(torch.where(better, pres, best_pres))
            for n, m in masks.items():
                sel = better.view(-1, *([1] * (m.dim() - 1)))
                best[n] = torch.where(sel, m.detach(), best[n])

        with on_grids(model, names, lambda n, grid: grid * masks[n], reshape):
            for _ in range(steps):
                with torch.enable_grad():
                    out = model(x).gather(1, t[:, None]).squeeze(1)
                    pres = _preservation(out, ref, preserve)
                    sparsity = _sparsity(masks, scale)
                    loss = (pres + lam * sparsity).sum()
                    grads = torch.autograd.grad(loss, list(masks.values()))
                keep_best(pres.detach(), sparsity.detach())
                for m, g in zip(masks.values(), grads):
                    m.grad = g
                opt.step()
                with torch.no_grad():
                    for m in masks.values():
                        m.clamp_(min=0)
            with torch.no_grad():
                out = model(x).gather(1, t[:, None]).squeeze(1)
                keep_best(_preservation(out, ref, preserve), _sparsity(masks, scale))
    return best, best_pres


def haf(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, *, layers: Sequence[str],
        steps: int = 30, lr: float = 0.05, lam: float = 1.0, keep: str = "loss", preserve: str = "two_sided",
        normalize: bool = True, upsample: bool = True, create_graph: bool = False,
        reshape: ReshapeArg = None) -> torch.Tensor:
    """HAF heatmaps [B,H,W] = sum_l norm01(upsample(mean_k M_l)) / L from ``learn_masks``. METHODS §3

    ``normalize=False``: sum_l upsample(mean_k M_l) / L, the raw masks (no per-layer norm01).

    ``upsample=False`` needs exactly one layer and returns its raw channel-mean mask [B,h,w].
    ``create_graph=True`` raises ValueError: the masks come from an inner optimisation (a bilevel
    problem), so the map is not differentiable w.r.t. the model here.
    """
    if create_graph:
        raise ValueError("method 'haf' does not support create_graph=True: its maps come from an inner "
                         "mask optimisation (bilevel); use a gradient or CAM method for training losses")
    names = resolve_layers(model, layers)
    if not upsample and len(names) != 1:
        raise ValueError(f"upsample=False needs exactly one layer (masks of different layers have "
                         f"different sizes), got layers={names}")
    masks, _ = learn_masks(model, x, target, layers=names, steps=steps, lr=lr, lam=lam, keep=keep,
                           preserve=preserve, reshape=reshape)
    maps = []
    for n in names:
        m = masks[n]
        if m.dim() != 4:
            raise ValueError(f"layer {n!r} outputs shape {tuple(m.shape)}; HAF needs [B,K,h,w] feature maps")
        maps.append(m.mean(1))
    if not upsample:
        return maps[0]
    size = (x.shape[-2], x.shape[-1])
    scale = norm01 if normalize else (lambda m: m)
    return sum(scale(_upsample(m, size)) for m in maps) / len(maps)


register("haf", Method(haf, "layered", default_layers="last2"))

__all__ = ["haf", "learn_masks"]
