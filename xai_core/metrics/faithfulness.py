"""Deletion and insertion AUC (RISE), batched over samples and steps (METHODS §6)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from xai_core._tensor import as_targets, check_images, check_maps, stable_argsort

Fill = str | float | torch.Tensor
AUCResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
K = TypeVar("K", bound=Hashable)


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


class Curve(NamedTuple):
    """One perturbation curve of a batch for ``perturbation_curve_set``: ``mode`` "deletion" or "insertion",
    pixels in the order of ``maps`` [B,H,W] (order="map", ties by pixel index) or in a random order drawn from
    ``generator`` (order="random"; ``maps`` may then be None)."""

    mode: str = "deletion"
    maps: torch.Tensor | None = None
    order: str = "map"
    generator: torch.Generator | None = None


def perturbation_curve_set(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
                           curves: Mapping[K, Curve], n_steps: int = 32, fill: Fill = "blur",
                           chunk_size: int | None = None) -> tuple[dict[K, torch.Tensor], torch.Tensor]:
    """Several perturbation curves of one batch at once: {key: [B,n_steps+1]} and the fractions [n_steps+1].

    Each curve equals ``perturbation_curves`` with its options, but the points every curve shares run once:
    with 0 or all pixels changed an image is x or its fill whatever the order, so the target's probability
    on x and on the fill image is computed once for all curves, and each curve adds only its n_steps - 1
    inner points. The inner points of all curves run in forwards of ``chunk_size`` images (default about
    1 MiB of input on CPU), filled across curves. Forward-only: ``model`` can be a copy made for inference
    (``xai_core.models.inference_copy``). METHODS §6
    """
    check_images(x)
    b, _, h, w = x.shape
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps} is not allowed: use an integer >= 1")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size={chunk_size} is not allowed: use None or an integer >= 1")
    for key, c in curves.items():
        if c.mode not in ("deletion", "insertion"):
            raise ValueError(f"curve {key!r}: mode={c.mode!r} is not allowed: use 'deletion' or 'insertion'")
        if c.order not in ("map", "random"):
            raise ValueError(f"curve {key!r}: order={c.order!r} is not allowed: use 'map' or 'random'")
        if c.order == "map" and c.maps is None:
            raise ValueError(f"curve {key!r}: order='map' needs maps of shape {(b, h, w)}")
        if c.maps is not None:
            check_maps(c.maps)
            if tuple(c.maps.shape) != (b, h, w):
                raise ValueError(f"curve {key!r}: maps has shape {tuple(c.maps.shape)} but x needs maps of "
                                 f"shape {(b, h, w)}")
    t = as_targets(target, b, None, x.device)
    n = h * w
    counts = torch.arange(n_steps + 1, device=x.device) * n // n_steps  # pixels changed at each point
    inner = n_steps - 1
    keys = list(curves)
    out = {k: torch.empty(b, n_steps + 1, device=x.device) for k in keys}  # normal tensors, written in place
    ends = torch.empty(2, b, device=x.device)  # the target's probability on x (row 0) and on the fill (row 1)
    with torch.inference_mode():  # forwards only (about 5-10% faster per forward than no_grad here)
        other = _fill_images(x, fill)
        per = _default_rows(x[:1], 2 * b + len(keys) * b * inner) if chunk_size is None else int(chunk_size)
        # the forwards' input, written in place (the layout the model asks for, e.g. an inference_copy's)
        fmt = getattr(model, "input_memory_format", torch.contiguous_format)
        buf = torch.empty((per, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
        writes: list[Callable[[torch.Tensor], None]] = []  # per source slice in buf, in order
        used = 0
        tt = t.tolist()

        def run() -> None:
            nonlocal used
            logits = model(buf[:used])
            as_targets(t, b, logits.shape[1], x.device)
            p = torch.softmax(logits.float(), dim=1)
            for write in writes:
                write(p)
            writes.clear()
            used = 0

        def feed(total: int, make: Callable[[int, int, torch.Tensor, int], Callable]) -> None:
            nonlocal used  # rows r0..r1 of a source are written into buf; the forward runs when it is full
            r = 0
            while r < total:
                take = min(per - used, total - r)
                writes.append(make(r, r + take, buf[used:used + take], used))
                r, used = r + take, used + take
                if used == per:
                    run()


        def make_end(r0: int, r1: int, dst: torch.Tensor, o: int) -> Callable:
            k = max(0, min(r1, b) - r0)
            dst[:k].copy_(x[r0:r0 + k])
            dst[k:].copy_(other[max(r0, b) - b:max(r1 - b, 0)])

            def write(p: torch.Tensor) -> None:
                rows = torch.arange(r0, r1, device=x.device) % b
                ends.view(-1)[r0:r1] = p[o:o + r1 - r0].gather(1, t[rows].unsqueeze(1)).squeeze(1)
            return write

        feed(2 * b, make_end)
        seen: list[tuple[str, torch.Tensor, K]] = []  # (mode, ranks, key) of the curves fed so far
        copies: list[tuple[K, K, torch.Tensor]] = []  # (key, source key, images whose inner points it copies)
        for key in keys:
            c = curves[key]
            ranks = pixel_ranks(c.maps.to(x.device) if c.order == "map" else torch.empty(b, h, w, device=x.device),
                                c.order, c.generator)
            to_fill = c.mode == "deletion"  # deletion: the changed pixels come from the fill; insertion: from x
            # an image whose pixels an earlier curve of the same mode changes in the same order has the same
            # inner points (the same images through the same model): computed once, copied (flat maps, equal
            # rankings of two methods)
            todo = torch.ones(b, dtype=torch.bool, device=x.device)
            for mode, prev, src in seen:
                if mode == c.mode and todo.any():
                    same = todo & (prev == ranks).all(1)
                    if same.any():
                        copies.append((key, src, same.nonzero().squeeze(1)))
                        todo &= ~same
            seen.append((c.mode, ranks, key))
            imgs = todo.nonzero().squeeze(1).tolist()

            def make(r0: int, r1: int, dst: torch.Tensor, o: int, ranks: torch.Tensor = ranks,
                     to_fill: bool = to_fill, res: torch.Tensor = out[key], imgs: list[int] = imgs) -> Callable:
                parts = []  # (image, first point, end point): rows are image-major, points 1..n_steps-1
                r = r0
                while r < r1:
                    j, k0 = divmod(r, inner)
                    i = imgs[j]
                    k1 = min(inner, k0 + r1 - r)
                    changed = (ranks[i] < counts[k0 + 1:k1 + 1].unsqueeze(1)).view(-1, 1, h, w)
                    d = r - r0
                    torch.where(changed == to_fill, other[i], x[i], out=dst[d:d + k1 - k0])
                    parts.append((i, k0 + 1, k1 + 1))
                    r += k1 - k0

                def write(p: torch.Tensor) -> None:
                    j = o
                    for i, ka, kb in parts:
                        res[i, ka:kb] = p[j:j + kb - ka, tt[i]]
                        j += kb - ka
                return write

            if inner and imgs:
                feed(len(imgs) * inner, make)
        if used:
            run()
        for key, src, rows in copies:  # in feeding order: a source is complete before it is copied
            out[key][rows, 1:-1] = out[src][rows, 1:-1]
    for key in keys:
        first, last = (0, 1) if curves[key].mode == "deletion" else (1, 0)
        out[key][:, 0], out[key][:, -1] = ends[first], ends[last]
    return out, counts.to(torch.float32) / n


def perturbation_curves(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor | int,
                        n_steps: int = 32, fill: Fill = "blur", chunk_size: int | None = None, *,
                        mode: str = "deletion", order: str = "map",
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probability of the target after changing 0..all pixels in n_steps chunks.

    Returns (curves [B,n_steps+1], fractions [n_steps+1]) with fractions[k] = (k*N // n_steps) / N,
    the share of the N pixels changed at point k. All B*(n_steps+1) images run in batched forwards of
    at most ``chunk_size`` images (default: about 1 MiB of input per forward on CPU). Several curves of one
    batch: ``perturbation_curve_set``. METHODS §6
    """
    check_images(x)
    check_maps(maps)
    b, _, h, w = x.shape
    if tuple(maps.shape) != (b, h, w):
        raise ValueError(f"maps has shape {tuple(maps.shape)} but x needs maps of shape {(b, h, w)}")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode={mode!r} is not allowed: use 'deletion' or 'insertion'")
    got, frac = perturbation_curve_set(model, x, target, {0: Curve(mode, maps, order, generator)}, n_steps, fill,
                                       chunk_size)
    return got[0], frac


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


__all__ = ["Curve", "deletion_auc", "gaussian_blur", "insertion_auc", "perturbation_curve_set", "perturbation_curves",
           "pixel_ranks"]
