"""Small tensor helpers shared by attribution, metrics and objectives (no state, no model mode changes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A map whose range is below this fraction of its largest magnitude is "flat": norm01 gives zeros.
# METHODS §2: floating-point noise of a flat map scaled to full range polluted most fused maps.
FLAT_RTOL = 1e-5


def norm01(maps: torch.Tensor, rtol: float = FLAT_RTOL) -> torch.Tensor:
    """Min-max normalise each map of a batch [B,...] to [0,1]; a (numerically) constant map -> zeros."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    flat_mask = rng <= rtol * scale.clamp_min(torch.finfo(maps.dtype).tiny)
    out = (flat - lo) / torch.where(flat_mask, torch.ones_like(rng), rng)
    out = torch.where(flat_mask, torch.zeros_like(out), out)
    return out.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of maps [B,h,w] or [B,K,h,w] to size (H,W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    squeeze = maps.dim() == 3
    m = maps.unsqueeze(1) if squeeze else maps
    out = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return out.squeeze(1) if squeeze else out


def check_images(x: torch.Tensor, name: str = "x") -> None:
    """Raise ValueError unless x is a 4-D floating tensor [B,C,H,W]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B,C,H,W], got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 4-D float tensor [B,C,H,W], got shape {tuple(x.shape)} "
                         f"and dtype {x.dtype}")


def check_maps(maps: torch.Tensor, name: str = "maps") -> None:
    """Raise ValueError unless maps is a 3-D tensor [B,H,W]."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a tensor of shape [B,H,W], got {shape}")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ValueError naming both shapes unless a and b have the same shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
                         "they must match")


def as_targets(target: torch.Tensor | int | list[int], batch: int, num_classes: int | None,
               device: torch.device) -> torch.Tensor:
    """Validate targets: an int (broadcast) or a LongTensor [B] of class indices in [0, num_classes)."""
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        t = torch.as_tensor(target, device=device)
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"target must have shape [{batch}] (one class per sample), got {tuple(t.shape)}")
        t = t.long()
    if num_classes is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise ValueError(f"target {bad} is out of range: the model has {num_classes} classes, "
                         f"allowed 0..{num_classes - 1}")
    return t


def check_unit_interval(value: float, name: str) -> None:
    """Raise ValueError unless 0 <= value <= 1."""
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name}={value} is out of range: allowed values are in [0, 1]")
