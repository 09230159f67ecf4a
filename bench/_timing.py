"""Shared timing for the benchmarks: fixed threads, warm-up, interleaved repeats, medians, the cost unit.

The cost unit is one forward and one backward to the input (``torch.autograd.grad`` w.r.t. the input
only, no parameter gradients) of the same model on the same batch. It is timed in the same process and
interleaved with the calls it normalises, so that a noisy, shared machine slows both alike.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fix_threads(n: int = 1) -> None:
    """One intra-op thread for torch (and OpenCV, which pytorch-grad-cam uses to resize), for every side."""
    torch.set_num_threads(n)
    try:
        import cv2
        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover - OpenCV comes with grad-cam
        pass


def unit_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    """The cost unit: forward, then autograd.grad of sum_i y_{t_i} w.r.t. the input only."""

    def unit() -> torch.Tensor:
        xg = x.detach().requires_grad_(True)
        y = model(xg).gather(1, target[:, None]).sum()
        return torch.autograd.grad(y, xg)[0]
    return unit


def measure(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time every callable ``warmup`` + ``repeats`` times, round-robin in alternating directions
    (A B C, C B A, A B C, ...), medians.

    Interleaving puts the side-by-side calls under the same background load; alternating the direction
    keeps any one call from always following the same neighbour (resnet18 Grad-CAM++ right after the
    cost unit's full backward read 1.08x Captum in fixed order, 0.98x alternated in-process); the first ``warmup``
    rounds (allocator, lazy init, caches) are dropped; garbage is collected before each timed call,
    not inside it. Returns {name: {"median_s", "times_s"}}.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.freeze()  # long-lived objects (torch, imports) out of the collector's way: per-call collects are cheap
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn = fns[name]
            gc.collect()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: {"median_s": statistics.median(v), "times_s": v} for k, v in times.items()}


def machine() -> dict:
    """What the numbers were measured on."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "device": "cpu"}


def positive_finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def write_json(payload: dict, name: str, out_dir: Path | str | None = None) -> Path:
    """Write ``payload`` to ``<out_dir>/<name>.json`` (default bench/results/, gitignored)."""
    d = Path(out_dir) if out_dir is not None else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def publish(payload: dict, name: str, out_dir: Path | str | None, table_md: str) -> dict:
    """Write the JSON, print the markdown table and where the JSON went; returns ``payload``."""
    path = write_json(payload, name, out_dir)
    print(table_md)
    print(f"\nwritten: {path}")
    return payload
