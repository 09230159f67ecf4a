"""MaxBoxAccV2 (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020),
computed as clovaai/wsolevaluation's ``BoxEvaluator`` with ``multi_contour_eval=True`` computes it.

For each map: min-max scaled to [0,1] (a constant or NaN map becomes zeros), quantised to uint8
(floor(255 s)); at each CAM threshold t of the grid (default 0, 0.001, ..., 0.999, the reference's
``cam_curve_interval``) the foreground is q > floor(t * max q); every contour of it (OpenCV's RETR_TREE:
the outer border of each 8-connected component and the border of each 4-connected hole) gives a box
(x, y, x + w, y + h) clipped to (W - 1, H - 1), with IoU counted over pixels inclusively (the reference's
``+ 1``), so a predicted box reaches one pixel past its contour except at the right and bottom edges; no
contour gives the box (0, 0, 0, 0). An image is a hit at (delta, t) when its best box has IoU >= delta with
at least one ground-truth box. MaxBoxAcc(delta) = max over t of the hit rate; MaxBoxAccV2 = its mean over
delta in {0.3, 0.5, 0.7}. Returned as fractions (the reference prints percent).

Ground-truth boxes are given in the library's (x0, y0, x1, y1) convention with x1, y1 one past the last
pixel (CUB's bounding_boxes.txt x, y, w, h gives x0 = x, x1 = x + w), [B,4] or [B,M,4] with rows of -1 as
padding, and go into the inclusive IoU as they are, as the reference's metadata boxes do.
"""

from __future__ import annotations

import numpy as np
import torch

from xai_core._tensor import check_maps
from xai_core.metrics.localisation import connected_components

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
_PIXELS_PER_PASS = 1 << 22  # component labelling of (image x threshold) masks, in passes of this many pixels


def default_cam_thresholds() -> torch.Tensor:
    """The reference's CAM threshold grid: numpy.arange(0, 1, 0.001) (float64)."""
    return torch.from_numpy(np.arange(0, 1, 0.001))


def _check_boxes(boxes: torch.Tensor, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.as_tensor(boxes, device=device)
    if boxes.dim() == 2:
        boxes = boxes[:, None]
    if boxes.dim() != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape [{b}, 4] or [{b}, M, 4] (x0,y0,x1,y1; rows of -1 pad), "
                         f"got {tuple(boxes.shape)}")
    valid = (boxes >= 0).all(-1)
    if not bool(valid.any(1).all()):
        missing = (~valid.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"image(s) {missing[:10]} have no ground-truth box (every row is padding)")
    return boxes.to(torch.float64), valid


def _quantised(maps: torch.Tensor) -> torch.Tensor:
    """floor(255 * minmax(map)) as the reference's normalize_scoremap then astype(uint8) gives it."""
    m = maps.detach().to(torch.float64).flatten(1)
    lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
    ok = (hi > lo) & ~torch.isnan(m).any(1, keepdim=True)
    s = torch.where(ok, (m - lo) / torch.where(ok, hi - lo, torch.ones_like(hi)), torch.zeros_like(m))
    return torch.floor(s * 255).clamp(0, 255).to(torch.int16).view_as(maps)


def _slot_boxes(lab: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive pixel bounding boxes [N,S,4] (x0,y0,x1,y1) of every label slot and which slots are used."""
    n, p = lab.shape
    idx = torch.arange(p, device=lab.device).expand(n, p)
    xs, ys = idx % w, idx // w
    out = []
    for coord, how, fill in ((xs, "amin", p), (ys, "amin", p), (xs, "amax", -1), (ys, "amax", -1)):
        acc = torch.full((n, p + 1), fill, dtype=torch.long, device=lab.device)
        out.append(acc.scatter_reduce_(1, lab, coord, how))
    used = out[0] < p
    used[:, 0] = False  # label 0: background (of this mask)
    return torch.stack(out, -1), used


def _best_iou(fg: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Best IoU [N] over every contour box of each mask [N,H,W] and each valid ground-truth box [N,M,4]."""
    n, h, w = fg.shape
    outer, used_o = _slot_boxes(connected_components(fg, 8).flatten(1), w)
    bg = connected_components(~fg, 4)
    edge = torch.cat([bg[:, 0], bg[:, -1], bg[:, :, 0], bg[:, :, -1]], 1)  # background reaching the frame
    holes, used_h = _slot_boxes(bg.flatten(1), w)
    used_h &= ~torch.zeros_like(used_h).scatter_(1, edge, True)
    holes = holes + torch.tensor([-1, -1, 1, 1], device=fg.device)  # a hole's border: the pixels around it
    boxes = torch.cat([outer, holes], 1)
    used = torch.cat([used_o, used_h], 1)
    # the reference's box: (x, y, x + w, y + h) clipped to the last pixel, i.e. one past the inclusive max
    limit = torch.tensor([w, h], device=fg.device) - 1
    boxes = torch.cat([boxes[..., :2], torch.minimum(boxes[..., 2:] + 1, limit)], -1).to(torch.float64)
    none = ~used.any(1)
    boxes[none, 0] = 0.0  # no contour: the box (0, 0, 0, 0)
    used[none, 0] = True
    p, g = boxes[:, :, None], gt[:, None]  # [N,S,1,4], [N,1,M,4]
    iw = (torch.minimum(p[..., 2], g[..., 2]) - torch.maximum(p[..., 0], g[..., 0]) + 1).clamp_min(0)
    ih = (torch.minimum(p[..., 3], g[..., 3]) - torch.maximum(p[..., 1], g[..., 1]) + 1).clamp_min(0)
    inter = iw * ih
    area = lambda z: (z[..., 2] - z[..., 0] + 1) * (z[..., 3] - z[..., 1] + 1)
    union = area(p) + area(g) - inter
    iou = torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                      torch.zeros_like(union))
    iou = iou.masked_fill(~(used[:, :, None] & valid[:, None]), -1.0)
    return iou.flatten(1).amax(1)


def box_hits(maps: torch.Tensor, boxes: torch.Tensor, cam_thresholds: torch.Tensor | None = None,
             iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> torch.Tensor:
    """Hits [B,D,T] (bool): whether image b's best contour box at CAM threshold t has IoU >= delta_d with
    one of its ground-truth boxes. Concatenate over batches, then ``max_box_acc``."""
    check_maps(maps)
    gt, valid = _check_boxes(boxes, maps.shape[0], maps.device)
    t = default_cam_thresholds() if cam_thresholds is None else torch.as_tensor(cam_thresholds)
    t = t.to(dtype=torch.float64, device=maps.device).flatten()
    if t.numel() == 0 or bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"cam_thresholds must be in [0, 1] (maps are scaled to [0, 1]), got {t.tolist()[:10]}")
    deltas = torch.as_tensor(iou_thresholds, dtype=torch.float64, device=maps.device).flatten()
    if deltas.numel() == 0 or bool(((deltas < 0) | (deltas > 1)).any()):
        raise ValueError(f"iou_thresholds must be in [0, 1], got {deltas.tolist()}")
    q = _quantised(maps)
    qmax = q.flatten(1).amax(1).to(torch.float64)
    k = torch.floor(t[None] * qmax[:, None]).long()  # [B,T] the reference's int(t * max(scoremap_image))
    levels, which = torch.unique(k, return_inverse=True)
    iou = _iou_at_levels(q, gt, valid, levels).gather(1, which)  # [B,T]
    return iou[:, None, :] >= deltas[None, :, None]


def _iou_at_levels(q: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Best contour-box IoU [B,L] of each quantised map [B,H,W] with foreground q > level, for each level;
    the (image x level) masks are labelled in passes of _PIXELS_PER_PASS pixels."""
    b, h, w = q.shape
    best = torch.empty(b, len(levels), dtype=torch.float64, device=q.device)
    step = max(1, _PIXELS_PER_PASS // max(1, b * h * w))
    for i in range(0, len(levels), step):
        lv = levels[i:i + step]
        fg = (q[:, None] > lv[None, :, None, None]).flatten(0, 1)  # [B*L,H,W]
        n = len(lv)
        best[:, i:i + n] = _best_iou(fg, gt.repeat_interleave(n, 0), valid.repeat_interleave(n, 0)).view(b, n)
    return best


LEVELS = 256  # uint8 quantisation: the foreground at any CAM threshold is q > k for one k in 0..255


def box_iou_levels(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Best contour-box IoU [B,256] of each map at every quantised level k (foreground q > k, q =
    floor(255 minmax(map)), as in ``box_hits``): all a set's MaxBoxAcc needs, per image, whatever the CAM
    threshold grid (a stored row of the evaluate stage). A constant map holds its one box's IoU at every
    level. ``max_box_acc_from_levels`` turns a set's rows into MaxBoxAcc."""
    check_maps(maps)
    gt, valid = _check_boxes(boxes, maps.shape[0], maps.device)
    q = _quantised(maps)
    out = _iou_at_levels(q, gt, valid, torch.arange(LEVELS, device=maps.device))
    const = q.flatten(1).amax(1) == 0  # no foreground at any level: the reference's box (0, 0, 0, 0)
    return torch.where(const[:, None], out[:, :1].expand(-1, LEVELS), out)


def max_box_acc_from_levels(levels: torch.Tensor, cam_thresholds: torch.Tensor | None = None,
                            iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> torch.Tensor:
    """MaxBoxAcc [D] of a set from its ``box_iou_levels`` rows [N,256] (equal to ``max_box_acc`` of its
    ``box_hits``): at threshold t every non-constant map's foreground is level floor(255 t)."""
    if not isinstance(levels, torch.Tensor) or levels.dim() != 2 or levels.shape[1] != LEVELS or not len(levels):
        raise ValueError(f"levels must be [N,{LEVELS}] rows of box_iou_levels with N >= 1, got "
                         f"{tuple(levels.shape) if isinstance(levels, torch.Tensor) else type(levels).__name__}")
    t = default_cam_thresholds() if cam_thresholds is None else torch.as_tensor(cam_thresholds)
    k = torch.floor(t.to(torch.float64).flatten() * 255).long().clamp(0, LEVELS - 1)
    deltas = torch.as_tensor(iou_thresholds, dtype=torch.float64).flatten()
    iou = levels.to(torch.float64)[:, k]  # [N,T]
    return (iou[:, None, :] >= deltas[None, :, None].to(iou.device)).to(torch.float64).mean(0).amax(-1)


def max_box_acc(hits: torch.Tensor) -> torch.Tensor:
    """MaxBoxAcc [D] from hits [N,D,T] of a whole evaluation set: the hit rate at the best CAM threshold,
    per IoU threshold. MaxBoxAccV2 = its mean over (0.3, 0.5, 0.7)."""
    if not isinstance(hits, torch.Tensor) or hits.dim() != 3 or hits.shape[0] == 0:
        raise ValueError(f"hits must be a tensor [N,D,T] with N >= 1 (box_hits of every image), got "
                         f"{tuple(hits.shape) if isinstance(hits, torch.Tensor) else type(hits).__name__}")
    return hits.to(torch.float64).mean(0).amax(-1)


def max_box_acc_v2(maps: torch.Tensor, boxes: torch.Tensor, cam_thresholds: torch.Tensor | None = None) -> float:
    """MaxBoxAccV2 of one set of maps [B,H,W] and their boxes: mean MaxBoxAcc over IoU 0.3, 0.5, 0.7."""
    return float(max_box_acc(box_hits(maps, boxes, cam_thresholds)).mean())


__all__ = ["IOU_THRESHOLDS", "box_hits", "box_iou_levels", "default_cam_thresholds", "max_box_acc",
           "max_box_acc_from_levels", "max_box_acc_v2"]
