"""Deletion and insertion AUC (RISE), batched over samples and steps (METHODS §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xai_core._tensor import as_targets, check_images, check_maps, stable_argsort

Fill = str | float | torch.Tensor
AUCResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def gaussian_blur(x: torch.Tensor, kernel_size: int | None = None,
                  sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of images [B,C,H,W], one depthwise conv2d per direction, replicate padding.

    Defaults: kernel ~ size/8 made odd and at least 3 (size = max(H,W)), sigma = size/16.
    """
    check_images(x)
    size = max(x.shape[-2:])
    if kernel_size is None:
        k = max(3, size // 8)
        k = k + 1 if k % 2 == 0 else k
    elif int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size} is not allowed: use a positive odd integer")
    else:
        k = int(kernel_size)
    s = max(size / 16.0, 1e-3) if sigma is None else float(sigma)
    if s <= 0:
        raise ValueError(f"sigma={sigma} is not allowed: use a positive number")
    if k == 1:
        return x.clone()
    coords = torch.arange(k, dtype=x.dtype, device=x.device) - (k - 1) / 2
    g = torch.exp(-(coords**2) / (2 * s * s))
    g = g / g.sum()
    c = x.shape[1]
    pad = k // 2
    out = F.pad(x, (pad, pad, 0, 0), mode="replicate")
    out = F.conv2d(out, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    out = F.pad(out, (0, 0, pad, pad), mode="replicate")
    return F.conv2d(out, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _fill_images(x: torch.Tensor, fill: Fill) -> torch.Tensor:
    if isinstance(fill, str):
        if fill != "blur":
            raise ValueError(f"fill={fill!r} is not allowed: use 'blur', a number or a tensor like x")
        return gaussian_blur(x)
    if isinstance(fill, torch.Tensor):
        try:
            return torch.broadcast_to(fill.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as e:
            raise ValueError(f"fill tensor of shape {tuple(fill.shape)} does not broadcast to x "
                             f"{tuple(x.shape)}") from e
    if isinstance(fill, bool) or not isinstance(fill, int | float):
        raise ValueError(f"fill={fill!r} is not allowed: use 'blur', a number or a tensor like x")
    return torch.full_like(x, float(fill))


def pixel_ranks(maps: torch.Tensor, order: str = "map", generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Rank [B,H*W] of each pixel in the removal order (0 = first changed).

    order="map": by map value descending, ties by pixel index (stable sort); order="random": a uniform
    random permutation per sample drawn from ``generator``.
    """
    flat = maps.flatten(1)
    b, n = flat.shape
    if order == "map":
        perm = stable_argsort(flat, descending=True)
    elif order == "random":
        dev = generator.device if generator is not None else torch.device("cpu")
        perm = torch.rand(b, n, generator=generator, device=dev).argsort(dim=1).to(flat.device)
    else:
        raise ValueError(f"order={order!r} is not allowed: use 'map' or 'random'")
    ranks = torch.empty_like(perm)
    ranks.scatter_(1, perm, torch.arange(n, device=flat.device).expand(b, n))
    return ranks


def perturbation_curves(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor | int,
                        n_steps: int = 32, fill: Fill = "blur", chunk_size: int | None = None, *,
                        mode: str = "deletion", order: str = "map",
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probability of the target after changing 0..all pixels in n_steps chunks.

    Returns (curves [B,n_steps+1], fractions [n_steps+1]) with fractions[k] = (k*N // n_steps) / N,
    the share of the N pixels changed at point k. All B*(n_steps+1) images run in batched forwards of
    at most ``chunk_size`` images (default: about 1 MiB of input per forward on CPU). METHODS §6
    """
    check_images(x)
    check_maps(maps)
    b, _, h, w = x.shape
    if tuple(maps.shape) != (b, h, w):
        raise ValueError(f"maps has shape {tuple(maps.shape)} but x needs maps of shape {(b, h, w)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps} is not allowed: use an integer >= 1")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size={chunk_size} is not allowed: use None or an integer >= 1")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode={mode!r} is not allowed: use 'deletion' or 'insertion'")
    t = as_targets(target, b, None, x.device)
    n = h * w
    steps = n_steps + 1
    counts = torch.arange(steps, device=x.device) * n // n_steps  # pixels changed at each point
    with torch.no_grad():
        ranks = pixel_ranks(maps.to(x.device), order, generator)
        other = _fill_images(x, fill)
        start, end = (x, other) if mode == "deletion" else (other, x)
        total = b * steps
        per = _default_rows(x[:1], total) if chunk_size is None else int(chunk_size)
        probs = []
        for r0 in range(0, total, per):
            rows = torch.arange(r0, min(r0 + per, total), device=x.device)
            bi, ki = rows // steps, rows % steps
            changed = (ranks[bi] < counts[ki].unsqueeze(1)).view(-1, 1, h, w)
            imgs = torch.where(changed, end[bi], start[bi])
            logits = model(imgs)
            if r0 == 0:
                as_targets(t, b, logits.shape[1], x.device)
            p = torch.softmax(logits.float(), dim=1)
            probs.append(p.gather(1, t[bi].unsqueeze(1)).squeeze(1))
    curves = torch.cat(probs).view(b, steps)
    return curves, counts.to(curves.dtype) / n


def _default_rows(one_image: torch.Tensor, total: int) -> int:
    """Images per forward when chunk_size is not given: about FORWARD_INPUT_BYTES of input per forward (one
    forward over all B*(n_steps+1) images outgrows the caches on CPU: docs/BENCHMARKS.md, metrics)."""
    from xai_core.attribution.gradients import FORWARD_INPUT_BYTES, default_steps_per_pass

    return default_steps_per_pass(one_image, total, FORWARD_INPUT_BYTES)


def _auc(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor | int, n_steps: int,
         fill: Fill, chunk_size: int | None, return_curves: bool, mode: str, order: str,
         generator: torch.Generator | None) -> AUCResult:
    curves, frac = perturbation_curves(model, x, maps, target, n_steps, fill, chunk_size, mode=mode,
                                       order=order, generator=generator)
    auc = torch.trapezoid(curves, frac, dim=1)
    return (auc, curves) if return_curves else auc


def deletion_auc(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor | int,
                 n_steps: int = 32, fill: Fill = "blur", chunk_size: int | None = None,
                 return_curves: bool = False, *, order: str = "map",
                 generator: torch.Generator | None = None) -> AUCResult:
    """Deletion AUC [B] (lower is better): the top pixels of the map are replaced by ``fill`` step by step.

    fill: "blur" (Gaussian-blurred copy), a constant, or a tensor broadcastable to x. order="random"
    (with ``generator``) gives the random-order baseline to report beside it. With return_curves=True
    returns (auc [B], curves [B,n_steps+1]). The model's mode is left as it is. METHODS §6
    """
    return _auc(model, x, maps, target, n_steps, fill, chunk_size, return_curves, "deletion", order,
                generator)


def insertion_auc(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor | int,
                  n_steps: int = 32, fill: Fill = "blur", chunk_size: int | None = None,
                  return_curves: bool = False, *, order: str = "map",
                  generator: torch.Generator | None = None) -> AUCResult:
    """Insertion AUC [B] (higher is better): start from ``fill`` and insert the top pixels of x step by step.

    Same options and return values as ``deletion_auc``. METHODS §6
    """
    return _auc(model, x, maps, target, n_steps, fill, chunk_size, return_curves, "insertion", order,
                generator)


__all__ = ["deletion_auc", "gaussian_blur", "insertion_auc", "perturbation_curves", "pixel_ranks"]
