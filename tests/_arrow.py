"""Parquet as a test reads it back: every column of an Arrow table as a numpy array (tensor columns as
[N, ...] arrays), without the pipeline's own readers."""

from __future__ import annotations

import numpy as np


def numpy_columns(table: object) -> dict[str, np.ndarray]:
    import ray.data  # noqa: F401 - registers the tensor extension type

    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        out[name] = col.to_numpy() if hasattr(col.type, "shape") else col.to_numpy(zero_copy_only=False)
    return out
