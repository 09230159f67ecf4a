"""Sparseness of maps: the Gini index (METHODS §6)."""

from __future__ import annotations

import torch

from xai_core._tensor import check_maps, sort_rows


def gini(maps: torch.Tensor) -> torch.Tensor:
    """Gini index [B] of |map| flattened per sample (Quantus' Sparseness formula, without its +1e-7).

    With a sorted ascending, k = 1..n: gini = sum_k (2k - n - 1) a_k / (n sum_k a_k); in [0, 1 - 1/n],
    0 for a constant map and for an all-zero map. METHODS §6
    """
    check_maps(maps)
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    a = sort_rows(maps.abs().flatten(1).to(dtype))
    n = a.shape[1]
    k = torch.arange(1, n + 1, device=a.device, dtype=dtype)
    # sum_k c_k a_k with c_k = 2k-n-1 = -c_{n+1-k} equals 1/2 sum_k c_k (a_k - a_{n+1-k}): every term is
    # >= 0, and a constant map gives exactly 0 (no rounding residue).
    num = 0.5 * ((2 * k - n - 1) * (a - a.flip(1))).sum(1)
    den = n * a.sum(1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


__all__ = ["gini"]
