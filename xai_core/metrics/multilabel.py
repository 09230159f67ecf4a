"""Multi-label classification: per-class average precision and its mean (mAP, as PASCAL VOC reports it).

AP of a class ranks every image by its score for that class against whether the image holds the class
(ties as one threshold, as sklearn's ``average_precision_score``); mAP is the mean over the classes that
occur at least once (a class with no positive image has no AP: NaN, left out of the mean).
"""

from __future__ import annotations

import torch

from xai_core.metrics.wsol import _average_precision


def average_precision_per_class(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP [K] of scores [N,K] (logits or probabilities: only the order matters) against multi-hot labels
    [N,K]; NaN for a class no image holds."""
    if scores.dim() != 2 or tuple(labels.shape) != tuple(scores.shape):
        raise ValueError(f"scores and labels must both be [N,K], got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    hot = labels.detach()
    if not bool(((hot == 0) | (hot == 1)).all()):
        raise ValueError("labels must be multi-hot (only 0 and 1)")
    return _average_precision(scores.detach().double().T.contiguous(), hot.bool().T.contiguous()).float()


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """mAP: the mean of ``average_precision_per_class`` over the classes present; NaN if none is."""
    ap = average_precision_per_class(scores, labels)
    return float(ap.nanmean()) if bool((~ap.isnan()).any()) else float("nan")


__all__ = ["average_precision_per_class", "mean_average_precision"]
