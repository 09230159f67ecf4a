"""Weakly supervised semantic segmentation (WSSS) from class maps: pseudo-labels with a background threshold
and the dataset-level mIoU against segmentation masks with an ignore label (PASCAL VOC's protocol: the class
activation maps of an image's labels, each scaled to max 1; a pixel is background where no map reaches the
threshold, else the class of the largest map; confusion counts over every pixel not marked ignore). METHODS §6
"""

from __future__ import annotations

import torch

from xai_core._tensor import check_maps

IGNORE = 255  # VOC's "void" label in SegmentationClass


def wsss_labels(maps: torch.Tensor, image: torch.Tensor, classes: torch.Tensor, n_images: int,
                thresholds: torch.Tensor | list[float] | float) -> torch.Tensor:
    """Pseudo-labels [T,N,H,W] (long: 0 = background, class + 1) from per-(image, class) maps [P,H,W].

    ``image`` [P] and ``classes`` [P] say which image and class each map is for (an image without a map is
    all background). Each map is clamped at 0 and divided by its own max (a map with max <= 0 stays 0); a
    pixel takes the class of its largest map when that map is >= the threshold (ties: the pair listed
    first), else background; one label set per threshold in ``thresholds`` [T]."""
    check_maps(maps)
    p, h, w = maps.shape
    image = torch.as_tensor(image, device=maps.device).long()
    classes = torch.as_tensor(classes, device=maps.device).long()
    if tuple(image.shape) != (p,) or tuple(classes.shape) != (p,):
        raise ValueError(f"image and classes must be [{p}] (one per map), got {tuple(image.shape)} and "
                         f"{tuple(classes.shape)}")
    if p and (int(image.min()) < 0 or int(image.max()) >= n_images):
        raise ValueError(f"image indices must be in [0, {n_images}), got {image.min().item()}..{image.max().item()}")
    if p and int(classes.min()) < 0:
        raise ValueError(f"class ids must be >= 0, got {classes.min().item()}")
    thr = torch.as_tensor(thresholds, dtype=torch.float32, device=maps.device).reshape(-1)
    if not bool(((thr >= 0) & (thr <= 1)).all()):
        raise ValueError(f"background thresholds must be in [0, 1], got {thr.tolist()}")
    m = maps.float().clamp_min(0)
    mx = m.flatten(1).amax(1).view(-1, 1, 1) if p else m.new_zeros(0, 1, 1)
    m = torch.where(mx > 0, m / mx.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(m))
    best = m.new_full((n_images, h, w), -1.0)
    label = torch.zeros((n_images, h, w), dtype=torch.long, device=maps.device)
    for k in range(p):  # in pair order: a later map must be strictly larger to take a pixel
        i = int(image[k])
        take = m[k] > best[i]
        best[i] = torch.where(take, m[k], best[i])
        label[i] = torch.where(take, classes[k] + 1, label[i])
    best = best.clamp_min(0)
    return torch.where(best.unsqueeze(0) >= thr.view(-1, 1, 1, 1), label.unsqueeze(0),
                       torch.zeros_like(label).unsqueeze(0))


def segmentation_counts(pred: torch.Tensor, gt: torch.Tensor, num_labels: int, ignore: int = IGNORE
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image intersections and unions [N,C] of label maps ``pred`` and ``gt`` [N,H,W] over labels
    0..num_labels-1 (C = num_labels), pixels where gt == ``ignore`` left out; a gt label outside the range
    (other than ``ignore``) is an error. Dataset-level IoU of label c = sum(inter[:, c]) / sum(union[:, c])."""
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(f"pred and gt must be label maps of one shape [N,H,W], got {tuple(pred.shape)} and "
                         f"{tuple(gt.shape)}")
    gt = gt.to(pred.device).long()
    pred = pred.long()
    valid = gt != ignore
    bad = valid & ((gt < 0) | (gt >= num_labels))
    if bool(bad.any()):
        raise ValueError(f"gt holds label {gt[bad][0].item()}: expected 0..{num_labels - 1} or {ignore} (ignore)")
    if bool((valid & ((pred < 0) | (pred >= num_labels))).any()):
        raise ValueError(f"pred holds labels outside 0..{num_labels - 1}")
    n = pred.shape[0]
    labels = torch.arange(num_labels, device=pred.device).view(1, -1, 1)
    p = (pred.flatten(1).unsqueeze(1) == labels) & valid.flatten(1).unsqueeze(1)
    g = (gt.flatten(1).unsqueeze(1) == labels) & valid.flatten(1).unsqueeze(1)
    inter = (p & g).sum(2).to(torch.float64).view(n, num_labels)
    union = (p | g).sum(2).to(torch.float64).view(n, num_labels)
    return inter, union


def miou(inter: torch.Tensor, union: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Dataset-level mIoU from per-image counts [N,C] (``segmentation_counts``): the mean over the labels with
    a non-zero union of sum(inter) / sum(union); returns (mIoU, per-label IoU [C], NaN where the union is 0)."""
    i, u = inter.sum(0), union.sum(0)
    iou = torch.where(u > 0, i / u.clamp_min(1), torch.full_like(u, float("nan")))
    return float(iou.nanmean()) if bool((u > 0).any()) else float("nan"), iou


def miou_interval(inter: torch.Tensor, union: torch.Tensor, n_resamples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the dataset-level mIoU over images (per-image counts [N,C] resampled
    with replacement, ``n_resamples`` times, seeded): the mIoU of each resample is computed from its summed
    counts, as ``miou``; NaN-mIoU resamples (no pixel outside ignore) are left out."""
    import numpy as np

    i, u = inter.double().cpu().numpy(), union.double().cpu().numpy()
    n = len(i)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, n_resamples, 256):
        k = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                      for _ in range(min(256, n_resamples - start))]).astype(np.float64)
        si, su = k @ i, k @ u
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(su > 0, si / np.where(su > 0, su, 1.0), np.nan)
        ok = (su > 0).any(1)
        vals.append(np.nanmean(iou[ok], axis=1))
    v = np.concatenate(vals)
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def best_background_threshold(inter: torch.Tensor, union: torch.Tensor, thresholds: list[float]
                              ) -> tuple[float, list[float]]:
    """The threshold of the largest dataset-level mIoU (the first of equal ones) from counts [T,N,C] of one
    split (WSSS chooses it on training images, never on the evaluated ones); returns (threshold, mIoU per
    threshold)."""
    if inter.dim() != 3 or inter.shape[0] != len(thresholds) or inter.shape != union.shape:
        raise ValueError(f"counts must be [T={len(thresholds)},N,C], got {tuple(inter.shape)} and "
                         f"{tuple(union.shape)}")
    curve = [miou(inter[t], union[t])[0] for t in range(len(thresholds))]
    finite = [(v, -t) for t, v in enumerate(curve) if v == v]
    if not finite:
        raise ValueError("no threshold has a finite mIoU: every label's union is 0 (no pixel outside ignore)")
    return float(thresholds[-max(finite)[1]]), curve


__all__ = ["IGNORE", "best_background_threshold", "miou", "miou_interval", "segmentation_counts", "wsss_labels"]
