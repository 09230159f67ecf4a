"""Small tensor helpers shared by attribution, metrics and objectives (no state, no model mode changes)."""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

# A map whose range is below this fraction of its largest magnitude is "flat": norm01 gives zeros.
# METHODS §2: floating-point noise of a flat map scaled to full range polluted most fused maps.
FLAT_RTOL = 1e-5


def seeded_generator(*words: int | str) -> torch.Generator:
    """A CPU generator seeded by a sequence of ints and names (a name enters as its CRC-32), mixed by
    numpy's SeedSequence: a seed per (split), (batch, model, purpose), ... with no collisions by addition."""
    ints = [zlib.crc32(w.encode()) if isinstance(w, str) else int(w) for w in words]
    state = np.random.SeedSequence(ints).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


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


def _numpy_rows(x: torch.Tensor) -> np.ndarray | None:
    """x [B,N] as a float32 numpy array when numpy's vectorised sort can stand in for torch's, else None:
    on the CPU, a float type that float32 holds exactly (float32, float16, bfloat16) and N < 2**32."""
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] >= 2**32:
        return None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return x.detach().float().numpy()


def stable_argsort(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """``torch.sort(x, dim=1, descending=descending, stable=True).indices`` for x [B,N], bit for bit.

    On the CPU (float32 and narrower) each value and its index become one 64-bit key (the value's bits
    made order-preserving as an unsigned integer, then the index), sorted by numpy's vectorised sort:
    ties keep index order by construction. torch's stable sort was 7x slower on 128 x 4,096 values
    (1 thread); see docs/BENCHMARKS.md, metrics. Other devices and dtypes use torch's sort.
    """
    a = _numpy_rows(x)
    if a is None:
        return torch.sort(x, dim=1, descending=descending, stable=True).indices
    # -0.0 == 0.0, and every NaN sorts as the largest value in torch's sort: one bit pattern each.
    bits = np.where(np.isnan(a), np.float32(np.nan), a + np.float32(0.0)).view(np.uint32)
    key = np.where(bits >> np.uint32(31) == 1, ~bits, bits | np.uint32(0x80000000))
    if descending:
        key = ~key
    keys = (key.astype(np.uint64) << np.uint64(32)) | np.arange(a.shape[1], dtype=np.uint64)
    keys.sort(axis=1)
    return torch.from_numpy((keys & np.uint64(0xFFFFFFFF)).astype(np.int64))


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.sort(x, dim=1).values`` for x [B,N] (ascending), with numpy's vectorised sort on the CPU
    (float32 and narrower: 24x faster than torch's on 64 x 4,096 values, 1 thread)."""
    a = _numpy_rows(x)
    if a is None:
        return torch.sort(x, dim=1).values
    return torch.from_numpy(np.sort(a, axis=1)).to(x.dtype)


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
    from xai_core.targets import is_multilabel

    if is_multilabel(target):
        raise ValueError("this function takes one class per image (an int or a LongTensor [B]); for "
                         "multi-label targets (multi-hot [B,K] or class lists) call explain(), which "
                         "expands them into (image, class) pairs")
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
