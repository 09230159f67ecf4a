"""Localisation metrics on maps [B,H,W] against object masks or boxes; all return [B] (METHODS §6)."""

from __future__ import annotations

import torch

from xai_core._tensor import check_maps, check_same_shape, check_unit_interval


def _check_maps_masks(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_maps(maps)
    check_maps(masks, "masks")
    check_same_shape(maps, masks, "maps", "masks")
    m = maps if maps.is_floating_point() else maps.float()
    return m, masks.to(device=maps.device, dtype=torch.bool) if masks.dtype != torch.bool else masks


def _out_dtype(maps: torch.Tensor) -> torch.dtype:
    return maps.dtype if maps.is_floating_point() else torch.float32


def _iou(pred: torch.Tensor, gt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """IoU [B] of boolean masks [B,H,W]; NaN where both are empty (union 0)."""
    inter = (pred & gt).flatten(1).sum(1).to(dtype)
    union = (pred | gt).flatten(1).sum(1).to(dtype)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def pseudo_masks(maps: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Boolean masks [B,H,W]: map >= tau * max of its own map; a map with max <= 0 gives an empty mask."""
    check_maps(maps)
    check_unit_interval(tau, "tau")
    mx = maps.flatten(1).amax(1).view(-1, 1, 1)
    return (maps >= tau * mx) & (mx > 0)


def default_tolerance(height: int) -> int:
    """Pointing-game tolerance in pixels: 15 at 224 px, scaled by the image height."""
    return round(15 * height / 224)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float | None = None,
                  strict: bool = False) -> torch.Tensor:
    """1.0 if the map's argmax lies within ``tolerance`` px (Euclidean) of the mask, else 0.0; NaN if empty.
    ``strict``: a distance of exactly ``tolerance`` misses (TorchRay's ``<``; the default counts it).

    Equivalent to dilating the mask with a disk of radius ``tolerance``; computed as the smallest squared
    distance from the argmax pixel (first one on ties, row-major) to a mask pixel. METHODS §6
    """
    maps, masks = _check_maps_masks(maps, masks)
    b, h, w = maps.shape
    tol = default_tolerance(h) if tolerance is None else tolerance
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"tolerance={tolerance} is not allowed: use None or a number of pixels >= 0")
    idx = maps.flatten(1).argmax(1)
    py, px = (idx // w).view(b, 1, 1), (idx % w).view(b, 1, 1)
    ys = torch.arange(h, device=maps.device).view(1, h, 1)
    xs = torch.arange(w, device=maps.device).view(1, 1, w)
    d2 = (ys - py) ** 2 + (xs - px) ** 2
    near = d2 < tol * tol if strict else d2 <= tol * tol
    hit = (near & masks).flatten(1).any(1).to(_out_dtype(maps))
    empty = ~masks.flatten(1).any(1)
    return torch.where(empty, torch.full_like(hit, float("nan")), hit)


def pointing_game_per_class(maps: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor, num_classes: int,
                            tolerance: float = 15, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class pointing-game accuracy [K] over (image, class) pairs, TorchRay's protocol
    (torchray.benchmark.pointing_game): pair p is a hit when some pixel of its class mask lies at squared
    distance < tolerance^2 (strictly; ``pointing_game`` counts <=) from the map's argmax (first on ties),
    else a miss; a class's accuracy is hits / (hits + misses), NaN for a class without a counted pair (TorchRay
    reports 0 there; its mean, over all classes, is then lower). ``keep`` [P] (bool) leaves pairs out, as
    TorchRay leaves out a class whose VOC objects are all "difficult" and, on its difficult subset, the pairs
    not flagged. Pairs with an empty mask are left out too. The benchmark's number is ``.nanmean()``."""
    maps, masks = _check_maps_masks(maps, masks)
    p = maps.shape[0]
    classes = torch.as_tensor(classes, device=maps.device).long()
    if tuple(classes.shape) != (p,) or bool(((classes < 0) | (classes >= num_classes)).any()):
        seen = f", values {classes.unique().tolist()[:10]}" if classes.numel() else ""
        raise ValueError(f"classes must be [{p}] class ids in [0, {num_classes}), "
                         f"got shape {tuple(classes.shape)}{seen}")
    keep = torch.ones(p, dtype=torch.bool, device=maps.device) if keep is None else \
        torch.as_tensor(keep, device=maps.device).bool()
    if tuple(keep.shape) != (p,):
        raise ValueError(f"keep must be [{p}] (one flag per pair), got {tuple(keep.shape)}")
    hit = pointing_game(maps, masks, tolerance, strict=True)  # NaN where the mask is empty
    counted = keep & ~hit.isnan()
    hit = hit.nan_to_num(0.0) > 0.5
    hits = torch.zeros(num_classes, dtype=torch.float64, device=maps.device)
    total = torch.zeros_like(hits)
    hits.index_add_(0, classes[counted], hit[counted].double())
    total.index_add_(0, classes[counted], torch.ones_like(hit[counted], dtype=torch.float64))
    return torch.where(total > 0, hits / total.clamp_min(1), torch.full_like(hits, float("nan")))


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of relu(map) inside the mask [B]; 0 for a map with no positive mass, NaN for an empty mask.

    METHODS §6 (relevance mass accuracy)
    """
    maps, masks = _check_maps_masks(maps, masks)
    pos = maps.clamp_min(0).flatten(1)
    total = pos.sum(1)
    inside = (pos * masks.flatten(1)).sum(1)
    out = torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                      torch.zeros_like(total))
    empty = ~masks.flatten(1).any(1)
    return torch.where(empty, torch.full_like(out, float("nan")), out)


def localisation_iou(maps: torch.Tensor, masks: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """IoU [B] of the region map >= tau*max with the mask; 0 for a map with max <= 0; NaN for an empty mask.

    METHODS §6
    """
    maps, masks = _check_maps_masks(maps, masks)
    iou = _iou(pseudo_masks(maps, tau), masks, _out_dtype(maps))
    empty = ~masks.flatten(1).any(1)
    return torch.where(empty, torch.full_like(iou, float("nan")), iou)


def wsss_miou(maps: torch.Tensor, masks: torch.Tensor, tau: float = 0.5, return_counts: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mIoU [B] of pseudo-masks (map >= tau*max) against masks, over {background, foreground}.

    mIoU = mean of the background IoU and the foreground IoU of the sample; a class absent from both the
    pseudo-mask and the mask (union 0) is left out of the mean, as in confusion-matrix mIoU. For the
    dataset-level mIoU, return_counts=True also returns intersections and unions [B,2] (column 0 =
    background, 1 = foreground): mIoU = mean over classes of sum(inter) / sum(union). METHODS §2, §6
    """
    maps, masks = _check_maps_masks(maps, masks)
    pred = pseudo_masks(maps, tau)
    dtype = _out_dtype(maps)
    preds = torch.stack([~pred, pred], 1).flatten(2)
    gts = torch.stack([~masks, masks], 1).flatten(2)
    inter = (preds & gts).sum(2).to(dtype)
    union = (preds | gts).sum(2).to(dtype)
    ious = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
    miou = ious.nanmean(1)
    return (miou, inter, union) if return_counts else miou


def _run_max(lab: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Spread the largest label along each horizontal run of foreground pixels (labels [B,H,W])."""
    b, h, w = lab.shape
    prev = torch.cat([torch.zeros_like(fg[..., :1]), fg[..., :-1]], dim=-1)
    run = (fg & ~prev).long().cumsum(-1)  # run number in its row; background pixels carry label 0
    run = run + torch.arange(b * h, device=lab.device).view(b, h, 1) * (w + 1)
    best = torch.zeros(b * h * (w + 1), dtype=lab.dtype, device=lab.device)
    best.scatter_reduce_(0, run.flatten(), lab.flatten(), "amax")
    return best[run] * fg


def _diagonal_max(lab: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """The largest label among each foreground pixel's own and its four diagonal neighbours' (labels [B,H,W])."""
    p = torch.nn.functional.pad(lab, (1, 1, 1, 1))
    h, w = lab.shape[1:]
    diag = torch.stack([p[:, :h, :w], p[:, :h, 2:], p[:, 2:, :w], p[:, 2:, 2:]]).amax(0)
    return torch.maximum(lab, diag) * fg


def connected_components(fg: torch.Tensor, connectivity: int = 4) -> torch.Tensor:
    """Component labels [B,H,W] of boolean masks [B,H,W], 4- or 8-connected (``connectivity``): 0 =
    background, else the largest (1-based, row-major) pixel index in the component. Vectorised over the
    batch: the largest label is spread along whole horizontal then vertical runs of foreground (and, if
    8-connected, to diagonal neighbours), then by pointer jumping, until nothing changes."""
    check_maps(fg, "fg")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    b, h, w = fg.shape
    fg = fg.bool()
    fg_t = fg.transpose(1, 2).contiguous()
    lab = torch.arange(1, h * w + 1, device=fg.device).view(1, h, w).expand(b, h, w) * fg
    while True:
        new = _run_max(lab, fg)
        new = _run_max(new.transpose(1, 2).contiguous(), fg_t).transpose(1, 2)
        if connectivity == 8:
            new = _diagonal_max(new.contiguous(), fg)
        new = new.reshape(b, h * w)
        # pointer jumping: a label is the (1-based) index of a pixel of the same component, and that
        # pixel's own label is at least as large; following it spreads labels like path compression
        while True:
            jump = torch.maximum(new, new.gather(1, (new - 1).clamp_min(0)) * (new > 0))
            if torch.equal(jump, new):
                break
            new = jump
        new = new.view(b, h, w)
        if torch.equal(new, lab):
            return lab
        lab = new


def largest_component_boxes(maps: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Box [B,4] (x0,y0,x1,y1; x1,y1 exclusive) of the largest 4-connected component of map >= tau*max.

    Ties between equal-size components go to the one with the smaller label; a map with max <= 0 has no
    component and gets the empty box (0,0,0,0).
    """
    fg = pseudo_masks(maps, tau)
    b, h, w = fg.shape
    lab = connected_components(fg).flatten(1)
    sizes = torch.zeros(b, h * w + 1, dtype=torch.long, device=lab.device)
    sizes.scatter_add_(1, lab, torch.ones_like(lab))
    sizes[:, 0] = 0
    best = sizes.argmax(1, keepdim=True)
    sel = (lab == best) & (lab > 0)
    idx = torch.arange(h * w, device=lab.device).expand(b, -1)
    ys, xs = idx // w, idx % w
    big = h * w
    y0 = torch.where(sel, ys, big).amin(1)
    x0 = torch.where(sel, xs, big).amin(1)
    y1 = torch.where(sel, ys, -1).amax(1) + 1
    x1 = torch.where(sel, xs, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return torch.where(sel.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU [B] of paired boxes [B,4] (x0,y0,x1,y1; x1,y1 exclusive); 0 where the union is empty."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = iw * ih
    area = lambda z: (z[:, 2] - z[:, 0]).clamp_min(0) * (z[:, 3] - z[:, 1]).clamp_min(0)
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def wsol_top1_loc(maps: torch.Tensor, boxes: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor,
                  tau: float = 0.5, iou_threshold: float = 0.5) -> torch.Tensor:
    """WSOL top-1 localisation [B]: 1.0 if pred == label and the box of the largest connected component
    of map >= tau*max has IoU >= iou_threshold with the ground-truth box (x0,y0,x1,y1 exclusive). METHODS §6
    """
    check_maps(maps)
    check_unit_interval(iou_threshold, "iou_threshold")
    b = maps.shape[0]
    boxes = torch.as_tensor(boxes, device=maps.device)
    if tuple(boxes.shape) != (b, 4):
        raise ValueError(f"boxes must have shape [{b}, 4] (x0,y0,x1,y1), got {tuple(boxes.shape)}")
    pred = torch.as_tensor(pred, device=maps.device)
    labels = torch.as_tensor(labels, device=maps.device)
    for name, v in (("pred", pred), ("labels", labels)):
        if tuple(v.shape) != (b,):
            raise ValueError(f"{name} must have shape [{b}] (one class per sample), got {tuple(v.shape)}")
    iou = box_iou(largest_component_boxes(maps, tau), boxes)
    ok = (pred == labels) & (iou >= iou_threshold)
    return ok.to(_out_dtype(maps))


__all__ = ["box_iou", "connected_components", "default_tolerance", "energy_pointing_game",
           "largest_component_boxes", "localisation_iou", "pointing_game", "pointing_game_per_class", "pseudo_masks",
           "wsol_top1_loc", "wsss_miou"]
