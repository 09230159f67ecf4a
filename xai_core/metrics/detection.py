"""Adversarial detection from explanation maps (METHODS §3b).

PGD adversarial copies of images; maps for the predicted class of the clean and adversarial images; a
small CNN trained on the maps to tell them apart; AUROC on a held-out split of the images (the clean
and adversarial copy of an image are always in the same split).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xai_core._tensor import as_targets, check_images, check_maps, check_unit_interval, norm01
from xai_core.perturb import pgd

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor | int, eps: float = 8 / 255,
                         steps: int = 10, step_size: float | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD over the whole image (random start); step_size None -> 2.5 * eps / steps. METHODS §3b"""
    if step_size is None and isinstance(steps, int) and steps >= 1:
        step_size = 2.5 * eps / steps
    step = 2 / 255 if step_size is None else step_size  # bad steps: pgd raises the ValueError
    return pgd(model, x, y, region=None, eps=eps, step_size=step, steps=steps, random_start=True,
               generator=generator)


class DetectorCNN(nn.Module):
    """Two 3x3 conv layers (8 and 16 channels, ReLU, 2x2 max-pool after the first), global average pool,
    linear -> one logit (adversarial vs clean). Input: maps [N,1,H,W] (or [N,H,W])."""

    def __init__(self, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, 1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        h = maps.unsqueeze(1) if maps.dim() == 3 else maps
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)
        h = F.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1)).squeeze(1)


def _check_binary(labels: torch.Tensor, n: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if tuple(labels.shape) != (n,) or not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"labels must be a tensor of shape [{n}] holding only 0 (clean) and "
                         f"1 (adversarial), got shape {tuple(labels.shape)}")
    return labels


def train_detector(maps: torch.Tensor, labels: torch.Tensor, *, epochs: int = 30, lr: float = 1e-3,
                   batch_size: int = 64, seed: int = 0) -> DetectorCNN:
    """Train a ``DetectorCNN`` (Adam, BCE) on maps [N,H,W] (norm01'd per map here); labels 0/1 [N].

    Initialisation and shuffling come from ``seed`` only (the global RNG state is left as it was).
    Returns the detector in eval mode on the maps' device. METHODS §3b
    """
    check_maps(maps)
    y = _check_binary(labels, maps.shape[0]).to(maps.device, torch.float32)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} is not allowed: use an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: use an integer >= 1")
    inputs = norm01(maps.detach().float())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        det = DetectorCNN().to(maps.device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(det.parameters(), lr=lr)
    det.train()
    n = inputs.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(maps.device)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                loss = F.binary_cross_entropy_with_logits(det(inputs[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return det.eval()


def detector_scores(det: DetectorCNN, maps: torch.Tensor) -> torch.Tensor:
    """Detector logits [N] for maps [N,H,W] (norm01'd per map, as in training)."""
    check_maps(maps)
    with torch.no_grad():
        return det(norm01(maps.detach().float()))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUROC by the Mann-Whitney U statistic with average ranks for ties (label 1 = positive).

    AUROC = (sum of positive ranks - P(P+1)/2) / (P N); ValueError unless both classes are present.
    """
    s = torch.as_tensor(scores).detach().flatten().double().cpu()
    y = _check_binary(torch.as_tensor(labels).detach().flatten().cpu(), s.shape[0]).bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes: got {n_pos} positives and {n_neg} negatives")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each distinct value
    rank_sum = avg_rank[inverse][y].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def detection_auroc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, explain_fn: ExplainFn, *,
                    eps: float = 8 / 255, steps: int = 10, train_fraction: float = 0.5, epochs: int = 30,
                    seed: int = 0) -> dict[str, float | int]:
    """The whole METHODS §3b protocol for one method; returns auroc, n_train, n_test, attack_success.

    Images (not maps) are split: a fraction ``train_fraction`` of them (at least one on each side)
    trains the detector on their clean and adversarial maps, the rest is held out. ``n_train`` and
    ``n_test`` count maps (two per image). ``attack_success`` is the fraction of adversarial examples
    whose prediction differs from ``y``. The model's mode is the caller's (no implicit eval()).
    """
    check_images(x)
    b = x.shape[0]
    if b < 2:
        raise ValueError(f"detection_auroc needs at least 2 images (one train, one held out), got {b}")
    check_unit_interval(train_fraction, "train_fraction")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(x)
    y = as_targets(y, b, logits.shape[1], x.device)
    pred_clean = logits.argmax(1)
    x_adv = adversarial_examples(model, x, y, eps=eps, steps=steps, generator=g)
    with torch.no_grad():
        pred_adv = model(x_adv).argmax(1)
    maps = torch.cat([explain_fn(model, x, pred_clean).detach(), explain_fn(model, x_adv, pred_adv).detach()])
    check_maps(maps)
    labels = torch.cat([torch.zeros(b), torch.ones(b)]).to(maps.device)
    n_img = min(max(round(train_fraction * b), 1), b - 1)
    perm = torch.randperm(b, generator=g).to(maps.device)
    tr, te = perm[:n_img], perm[n_img:]
    tr, te = torch.cat([tr, tr + b]), torch.cat([te, te + b])
    det = train_detector(maps[tr], labels[tr], epochs=epochs, seed=seed)
    score = auroc(detector_scores(det, maps[te]), labels[te])
    return {"auroc": score, "n_train": int(tr.numel()), "n_test": int(te.numel()),
            "attack_success": float((pred_adv != y).float().mean())}


def _auroc_ci(scores: torch.Tensor, labels: torch.Tensor, n_images: int, n_resamples: int, confidence: float,
              seed: int) -> tuple[float, float]:
    """Percentile CI of the AUROC over images resampled with replacement (an image's clean and adversarial
    scores, at i and i + n_images, are drawn together)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        pick = torch.from_numpy(rng.integers(0, n_images, n_images))
        rows = torch.cat([pick, pick + n_images])
        draws.append(auroc(scores[rows], labels[rows]))
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def detection_cv(model: nn.Module, x: torch.Tensor, y: torch.Tensor, explain_fn: ExplainFn, *,
                 eps: float = 8 / 255, steps: int = 10, folds: int = 5, epochs: int = 30, seed: int = 0,
                 n_resamples: int = 2000, confidence: float = 0.95) -> dict[str, float | int]:
    """METHODS §3b with k-fold cross-validation: only images the model classifies correctly when clean and
    the attack flips (otherwise "adversarial" maps include failed attacks and "clean" ones misclassified
    images). Images are split into ``folds`` folds (an image's two maps in the same fold); each fold is
    scored by a detector trained on the others; the AUROC of the pooled out-of-fold scores comes with a
    bootstrap CI over images. Returns auroc, low, high, n_images (used), n_correct, attack_success (of
    the correctly classified images). Fewer used images than folds: auroc, low, high are NaN."""
    check_images(x)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds={folds!r} is not allowed: use an integer >= 2")
    b = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(x)
    y = as_targets(y, b, logits.shape[1], x.device)
    correct = logits.argmax(1) == y
    x_adv = adversarial_examples(model, x, y, eps=eps, steps=steps, generator=g)
    with torch.no_grad():
        pred_adv = model(x_adv).argmax(1)
    used = correct & (pred_adv != y)
    n_correct, n = int(correct.sum()), int(used.sum())
    out: dict[str, float | int] = {"n_images": n, "n_correct": n_correct,
                                   "attack_success": float(used.sum() / correct.sum()) if n_correct else float("nan")}
    nan = float("nan")
    if n < folds:
        return {**out, "auroc": nan, "low": nan, "high": nan}
    xc, xa, yc, ya = x[used], x_adv[used], y[used], pred_adv[used]
    maps = torch.cat([explain_fn(model, xc, yc).detach(), explain_fn(model, xa, ya).detach()])
    check_maps(maps)
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).to(maps.device)
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=g)] = torch.arange(n) % folds
    fold_of = torch.cat([fold_of, fold_of]).to(maps.device)
    scores = torch.empty(2 * n, device=maps.device)
    for f in range(folds):
        test = fold_of == f
        det = train_detector(maps[~test], labels[~test], epochs=epochs, seed=seed + f)
        scores[test] = detector_scores(det, maps[test])
    scores, labels = scores.cpu(), labels.cpu()
    low, high = _auroc_ci(scores, labels, n, n_resamples, confidence, seed)
    return {**out, "auroc": auroc(scores, labels), "low": low, "high": high}


__all__ = ["DetectorCNN", "adversarial_examples", "auroc", "detection_auroc", "detection_cv", "detector_scores",
           "train_detector"]
