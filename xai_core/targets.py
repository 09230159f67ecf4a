"""Multi-label targets: the one expansion of a batch's label sets into (image, class) pairs.

``explain`` takes a per-sample target (an int or a LongTensor [B]) or a multi-label one: a multi-hot
[B,K] tensor or a list of B class lists. The latter becomes ``Pairs``: one row per (image, class), in
image order and, within an image, in class order (multi-hot) or list order. Methods that can compute
several classes of an image from one forward take ``Pairs`` as their target (``layer_maps``: one forward
of the B images, one backward per label rank); the others run on the expanded batch ``pairs.rows(x)``.
Metrics take per-pair rows: ``pairs.rows(masks)`` for a per-image mask, ``pairs.class_masks(m)`` for
per-class masks [B,K,H,W].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pairs:
    """(image, class) pairs of a batch: ``image`` [P] indexes the batch, ``target`` [P] the classes;
    ``rank`` [P] is the pair's position among its image's classes (0, 1, ...); ``num_classes`` is the
    width of a multi-hot target (None for class lists)."""

    image: torch.Tensor
    target: torch.Tensor
    rank: torch.Tensor
    batch: int
    num_classes: int | None = None

    def __len__(self) -> int:
        return int(self.image.numel())

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """Per-image rows [B,...] -> per-pair rows [P,...] (images, masks, boxes, ...)."""
        if t.shape[0] != self.batch:
            raise ValueError(f"expected {self.batch} rows (one per image), got shape {tuple(t.shape)}")
        return t[self.image.to(t.device)]

    def class_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Per-class masks [B,K,H,W] -> the mask of each pair's class [P,H,W]."""
        if masks.dim() != 4 or masks.shape[0] != self.batch:
            raise ValueError(f"class masks must have shape [{self.batch},K,H,W], got {tuple(masks.shape)}")
        if len(self) and int(self.target.max()) >= masks.shape[1]:
            raise ValueError(f"class {int(self.target.max())} has no mask: the masks have {masks.shape[1]} "
                             "classes")
        return masks[self.image.to(masks.device), self.target.to(masks.device)]

    def to(self, device: torch.device) -> Pairs:
        return Pairs(self.image.to(device), self.target.to(device), self.rank.to(device), self.batch,
                     self.num_classes)


@dataclass(frozen=True)
class PairMaps:
    """What ``explain`` returns for a multi-label target: ``maps`` [P,H,W] (raw [P,C,H,W] with
    reduce=None), row p the map of class ``target[p]`` of image ``image[p]``."""

    maps: torch.Tensor
    pairs: Pairs

    @property
    def image(self) -> torch.Tensor:
        return self.pairs.image

    @property
    def target(self) -> torch.Tensor:
        return self.pairs.target


def rows_for(t: torch.Tensor, target: object) -> torch.Tensor:
    """``t`` per image, or per pair when ``target`` is Pairs (what a method multiplies its gradients by)."""
    return target.rows(t) if isinstance(target, Pairs) else t


def is_multilabel(target: object) -> bool:
    """Whether ``target`` is a multi-label target (multi-hot [B,K], class lists, or Pairs)."""
    if isinstance(target, Pairs):
        return True
    if isinstance(target, torch.Tensor):
        return target.dim() == 2
    return isinstance(target, (list, tuple)) and len(target) > 0 and all(
        isinstance(t, (list, tuple, torch.Tensor)) and not (isinstance(t, torch.Tensor) and t.dim() == 0)
        for t in target)


def label_pairs(target: torch.Tensor | Sequence[Sequence[int]] | Pairs, batch: int) -> Pairs:
    """Expand a multi-hot [B,K] tensor (0/1, bool or numeric) or a list of B class lists into Pairs."""
    if isinstance(target, Pairs):
        if target.batch != batch:
            raise ValueError(f"target pairs are for a batch of {target.batch} images, got {batch}")
        return target
    if isinstance(target, torch.Tensor):
        if target.dim() != 2 or target.shape[0] != batch:
            raise ValueError(f"a multi-hot target must have shape [{batch},K], got {tuple(target.shape)}")
        hot = target.detach()
        if not bool(((hot == 0) | (hot == 1)).all()):
            bad = hot[(hot != 0) & (hot != 1)][0].item()
            raise ValueError(f"a multi-hot target holds only 0 and 1, got {bad}")
        image, cls = (hot != 0).nonzero(as_tuple=True)  # row-major: image order, then class order
        counts = torch.bincount(image, minlength=batch)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(image.numel(), device=image.device) - start[image]
        return Pairs(image.long().cpu(), cls.long().cpu(), rank.long().cpu(), batch, int(target.shape[1]))
    if len(target) != batch:
        raise ValueError(f"a list of class lists must have one list per image ({batch}), got {len(target)}")
    image, cls, rank = [], [], []
    for i, labels in enumerate(target):
        labels = [int(c) for c in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
        if len(set(labels)) != len(labels):
            raise ValueError(f"image {i} lists a class twice: {labels}")
        for r, c in enumerate(labels):
            image.append(i)
            cls.append(c)
            rank.append(r)
    if any(c < 0 for c in cls):
        raise ValueError(f"class {min(cls)} is out of range: classes are >= 0")
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return Pairs(as_long(image), as_long(cls), as_long(rank), batch)


__all__ = ["PairMaps", "Pairs", "is_multilabel", "label_pairs", "rows_for"]
