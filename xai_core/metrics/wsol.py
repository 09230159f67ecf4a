"""Threshold-free localisation (Choe et al., "Evaluating Weakly Supervised Object Localization Methods
Right", CVPR 2020): pixel average precision of a map against the object mask, and the IoU at a threshold
chosen on validation.

pxap(maps, masks) [B]: each image's pixels ranked by the map, every distinct map value a threshold,
AP = sum_n (R_n - R_{n-1}) P_n as sklearn.metrics.average_precision_score computes it; NaN for an
empty mask. Invariant to any increasing transform of a map, so no normalisation is needed.
dataset_pxap(maps, masks): the paper's dataset-level PxAP: each map min-max normalised to [0,1] (their
normalize_scoremap), then one precision-recall curve over the pooled pixels of every image.
iou_curve / best_threshold / iou_at: the paper's MaxIoU protocol split in two: the threshold on
norm01(map) that maximises the mean IoU on a validation split, then the IoU at that threshold on test.
"""

from __future__ import annotations

import torch

from xai_core._tensor import check_maps, check_same_shape


def _check(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_maps(maps)
    check_maps(masks, "masks")
    check_same_shape(maps, masks, "maps", "masks")
    return maps.detach().float(), masks.to(device=maps.device, dtype=torch.bool)


def _average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP [B] of scores [B,P] against boolean labels [B,P], ties as one threshold; NaN without positives.

    Sorted by score (descending), a positive at rank j contributes precision(e)/n_pos, where e is the last
    rank of j's tie run: summing over positives is summing Delta-recall x precision over thresholds.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    s = scores.gather(1, order)
    y = labels.gather(1, order).to(torch.float64)
    p = s.shape[1]
    tp = y.cumsum(1)
    ranks = torch.arange(1, p + 1, device=s.device, dtype=torch.float64).expand_as(tp)
    precision = tp / ranks
    run_end = torch.ones_like(s, dtype=torch.bool)
    run_end[:, :-1] = s[:, 1:] != s[:, :-1]
    # for every rank, the precision at the end of its tie run: a reverse running minimum of end indices
    idx = torch.where(run_end, torch.arange(p, device=s.device).expand_as(s), torch.full_like(order, p))
    end_of = idx.flip(1).cummin(1).values.flip(1)
    prec_at_end = precision.gather(1, end_of)
    n_pos = y.sum(1)
    ap = (prec_at_end * y).sum(1) / n_pos.clamp_min(1)
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def pxap(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel average precision of each map against its object mask [B]; NaN for an empty mask."""
    m, gt = _check(maps, masks)
    return _average_precision(m.flatten(1), gt.flatten(1)).to(maps.dtype if maps.is_floating_point() else torch.float32)


def norm01_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0,1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    return out.view_as(maps)


def dataset_pxap(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Dataset-level PxAP: one AP over the pooled pixels of all (norm01) maps; NaN if no mask pixel."""
    m, gt = _check(maps, masks)
    return float(_average_precision(norm01_maps(m).reshape(1, -1), gt.reshape(1, -1))[0])


def iou_curve(maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """IoU [B,T] of norm01(map) >= t with the mask, for each threshold t; NaN where both are empty."""
    m, gt = _check(maps, masks)
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=m.device).flatten()
    if t.numel() == 0 or bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"thresholds {t.tolist()}: at least one, each in [0, 1] (maps are scaled to [0,1])")
    scaled, g = norm01_maps(m).flatten(1), gt.flatten(1)
    out = []
    for thr in t:  # one [B,P] comparison per threshold: never a [B,T,P] array
        pred = scaled >= thr
        inter, union = (pred & g).sum(1).float(), (pred | g).sum(1).float()
        out.append(torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan"))))
    return torch.stack(out, 1)


def best_threshold(maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor | None = None) -> float:
    """The threshold (default 0, 0.01, ..., 0.99) of the highest mean IoU on these (validation) maps."""
    t = torch.arange(100, dtype=torch.float32) / 100 if thresholds is None else torch.as_tensor(thresholds).float()
    mean = torch.nanmean(iou_curve(maps, masks, t), dim=0)
    if bool(torch.isnan(mean).all()):
        raise ValueError("no map/mask pair with a non-empty union: cannot choose a threshold")
    return float(t[int(torch.nan_to_num(mean, nan=-1.0).argmax())])


def iou_at(maps: torch.Tensor, masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """IoU [B] of norm01(map) >= threshold (chosen on validation by best_threshold) with the mask."""
    return iou_curve(maps, masks, torch.tensor([float(threshold)]))[:, 0]


__all__ = ["best_threshold", "dataset_pxap", "iou_at", "iou_curve", "norm01_maps", "pxap"]
