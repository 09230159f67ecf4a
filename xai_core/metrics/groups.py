"""Group accuracies (METHODS §6): the groups of the benchmark are (class, background family) pairs.

group_accuracy(correct, groups, min_size) -> {"mean": mean over samples, "worst": the lowest accuracy
among groups with at least ``min_size`` samples (smaller groups are too noisy to be the worst: at 20
samples one error moves a group's accuracy by 5 points), "group_mean": the unweighted mean over those
groups, "groups": {group id: (accuracy, size)}, "small": ids of the groups left out}.
"""

from __future__ import annotations

import torch


def group_ids(labels: torch.Tensor, backgrounds: torch.Tensor, num_backgrounds: int) -> torch.Tensor:
    """One id per (class, background) pair: label * num_backgrounds + background."""
    labels, backgrounds = torch.as_tensor(labels).long(), torch.as_tensor(backgrounds).long()
    if labels.shape != backgrounds.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and backgrounds {tuple(backgrounds.shape)} must match")
    if bool(((backgrounds < 0) | (backgrounds >= num_backgrounds)).any()):
        raise ValueError(f"background ids must be in [0, {num_backgrounds}), got {sorted(set(backgrounds.tolist()))}")
    return labels * num_backgrounds + backgrounds


def group_accuracy(correct: torch.Tensor, groups: torch.Tensor, min_size: int = 20) -> dict:
    """Mean, worst-group and group-mean accuracy of per-sample 0/1 ``correct`` over integer ``groups``."""
    c = torch.as_tensor(correct).double().flatten()
    g = torch.as_tensor(groups).long().flatten()
    if c.shape != g.shape or c.numel() == 0:
        raise ValueError(f"correct {tuple(c.shape)} and groups {tuple(g.shape)}: same non-empty length needed")
    if min_size < 1:
        raise ValueError(f"min_size={min_size}: at least 1")
    per = {}
    for gid in torch.unique(g).tolist():
        sel = c[g == gid]
        per[int(gid)] = (float(sel.mean()), int(sel.numel()))
    big = {k: v for k, v in per.items() if v[1] >= min_size}
    nan = float("nan")
    return {"mean": float(c.mean()), "worst": min((a for a, _ in big.values()), default=nan),
            "group_mean": sum(a for a, _ in big.values()) / len(big) if big else nan,
            "groups": per, "small": sorted(set(per) - set(big))}


__all__ = ["group_accuracy", "group_ids"]
