"""Arrow layout of dataset records (for Parquet shards), with an exact numpy round trip.

One row per sample. Arrays are flattened into list columns, with their shapes alongside:
  image        large_list<uint8 | float32>  the [C,H,W] image, row-major (dtype kept as given)
  image_shape  large_list<int32>            (C, H, W)
  mask, mask2  large_list<bool>             the [H,W] masks, row-major (shape = image_shape[1:])
  box          fixed_size_list<int64>[4]  (x0, y0, x1, y1); (-1,)*4 when unknown
  label, background, group, label2    int64
  path         string                 (image folders only)
Fields absent from the input are absent from the table; unknown keys raise ValueError.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

RECORD_FIELDS = ("image", "label", "mask", "box", "background", "group", "label2", "mask2", "path")
_SCALARS = ("label", "background", "group", "label2")
_MASKS = ("mask", "mask2")


def _flat_list(a: np.ndarray) -> pa.LargeListArray:
    """[N,...] -> list column whose row i holds a[i] flattened (64-bit offsets: big images are fine)."""
    n = a.shape[0]
    per_row = int(np.prod(a.shape[1:], dtype=np.int64))
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * per_row, pa.int64())
    return pa.LargeListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(a).reshape(-1)))


def to_arrow_table(arrays: dict[str, np.ndarray]) -> pa.Table:
    """A table with the columns of the module docstring, in RECORD_FIELDS order, from [N,...] arrays."""
    unknown = sorted(set(arrays) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"unknown record fields {unknown}: allowed are {', '.join(RECORD_FIELDS)}")
    if "image" not in arrays:
        raise ValueError("arrays must contain 'image' [N,C,H,W]")
    image = np.asarray(arrays["image"])
    if image.ndim != 4 or image.dtype not in (np.uint8, np.float32):
        raise ValueError(f"image must be uint8 or float32 [N,C,H,W], got {image.dtype} {image.shape}")
    n = image.shape[0]
    cols: dict[str, pa.Array] = {}
    for name in RECORD_FIELDS:
        if name not in arrays:
            continue
        a = np.asarray(arrays[name])
        if a.shape[:1] != (n,):
            raise ValueError(f"field {name!r} has {a.shape[0] if a.ndim else 0} rows but image has {n}")
        if name == "image":
            cols["image"] = _flat_list(a)
            shape = np.broadcast_to(np.asarray(a.shape[1:], np.int32), (n, 3))
            cols["image_shape"] = _flat_list(shape)
        elif name in _MASKS:
            if a.shape[1:] != image.shape[2:]:
                raise ValueError(f"{name} has shape {a.shape[1:]} but images are {image.shape[2:]}")
            cols[name] = _flat_list(a.astype(bool, copy=False))
        elif name == "box":
            flat = pa.array(np.ascontiguousarray(a, dtype=np.int64).reshape(-1))
            cols["box"] = pa.FixedSizeListArray.from_arrays(flat, 4)
        elif name == "path":
            cols["path"] = pa.array([str(p) for p in a], pa.string())
        else:
            cols[name] = pa.array(a.astype(np.int64, copy=False), pa.int64())
    return pa.table(cols)


def _unflatten(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False).reshape((len(arr), *shape))


def from_arrow_table(table: pa.Table) -> dict[str, np.ndarray]:
    """The inverse of ``to_arrow_table``: the same keys, dtypes and [N,...] shapes (all rows one shape)."""
    shapes = {tuple(s) for s in table.column("image_shape").to_pylist()}
    if not shapes:
        raise ValueError("the table has no rows")
    if len(shapes) != 1:
        raise ValueError(f"rows have different image shapes {sorted(shapes)}: cannot stack into one array")
    c, h, w = shapes.pop()
    out: dict[str, np.ndarray] = {}
    for name in RECORD_FIELDS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        if name == "image":
            out[name] = _unflatten(col, (c, h, w))
        elif name in _MASKS:
            out[name] = _unflatten(col, (h, w)).astype(bool)
        elif name == "box":
            out[name] = _unflatten(col, (4,)).astype(np.int64)
        elif name == "path":
            out[name] = np.asarray(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy().astype(np.int64)
    return out
