"""Paired bootstrap confidence intervals and the verdicts built on them (no Ray, no pandas).

A claim "A is better than B" is measured on the same units for both: the same test images under the same
training seed (model comparisons pair consistency_sN with erm_sN, which share their warm-up; method
comparisons pair two methods on one model). The values form two [S, N] arrays (seeds x images). One
bootstrap resample draws S seeds and N images with replacement, independently, and takes the mean of
A - B over the drawn cells: the interval then covers both sources of variation a rerun would meet (other
training seeds, other test images). The CI is the percentile interval of the resampled means.

verdict(): "supported" when the CI excludes 0 in the claimed direction, "contradicted" when it excludes 0
the other way, else "inconclusive"; lower-is-better metrics flip the direction, never the sign of the
difference (always A minus B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED = "supported", "contradicted", "inconclusive", "not measured"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED)


@dataclass(frozen=True)
class Difference:
    """mean(A - B) over the paired cells, its bootstrap CI, and the verdict for the claimed direction."""

    diff: float
    low: float
    high: float
    n_seeds: int
    n_items: int
    confidence: float
    higher_is_better: bool
    verdict: str
    statistic: str = "mean"

    def text(self, digits: int = 3) -> str:
        """'+0.012 [95% CI -0.003, +0.027] → inconclusive' (lower is better noted)."""
        if self.verdict == NOT_MEASURED:
            return f"→ {NOT_MEASURED}"
        f = f"{{:+.{digits}f}}"
        note = (", lower is better" if not self.higher_is_better else "") + (
            ", median of the paired differences" if self.statistic == "median" else "")
        return (f"{f.format(self.diff)} [{self.confidence:.0%} CI {f.format(self.low)}, {f.format(self.high)}; "
                f"{self.n_seeds} seed(s) x {self.n_items} images{note}] → {self.verdict}")


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """The verdict of a CI [low, high] on A - B for the claim "A is better than B"."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return NOT_MEASURED
    if low > 0:
        return SUPPORTED if higher_is_better else CONTRADICTED
    if high < 0:
        return CONTRADICTED if higher_is_better else SUPPORTED
    return INCONCLUSIVE


def _as_grid(v: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2:
        raise ValueError(f"{name} must be [images] or [seeds, images], got shape {v.shape}")
    return v


def _draws(s: int, n: int, n_resamples: int, seed: int, chunk: int):  # noqa: ANN202 - a generator
    """Per chunk of resamples: (first resample, seed draw counts [r, s], image draw counts [r, n]); the same
    seeded sequence for every statistic, so means and medians of one seed use the same resamples."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        c = np.stack([np.bincount(rng.integers(0, s, s), minlength=s) for _ in range(r)]).astype(np.float64)
        k = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(r)]).astype(np.float64)
        yield start, c, k


def bootstrap_means(d: np.ndarray, *, n_resamples: int = 2000, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """[n_resamples] means of the [S, N] array d (NaN cells left out) over resampled seeds and images.

    A resample's mean is sum_s,i c_s d_si k_i / sum_s,i c_s v_si k_i with c, k the draw counts of seeds
    and images and v the non-NaN indicator: one matrix product per chunk, never an [R, S, N] copy.
    """
    d = _as_grid(d, "d")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: at least 1")
    s, n = d.shape
    valid = ~np.isnan(d)
    vals = np.where(valid, d, 0.0)
    out = np.empty(n_resamples)
    for start, c, k in _draws(s, n, n_resamples, seed, chunk):
        r = len(c)
        num = ((c @ vals) * k).sum(1)
        den = ((c @ valid) * k).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + r] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def bootstrap_medians(d: np.ndarray, *, n_resamples: int = 2000, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """[n_resamples] medians of the non-NaN cells of d [S, N] over resampled seeds and images (the same
    draws as bootstrap_means): each cell weighs (draws of its seed) x (draws of its image); the lower
    weighted median (the first sorted value whose cumulative weight reaches half)."""
    d = _as_grid(d, "d")
    s, n = d.shape
    si, ii = np.nonzero(~np.isnan(d))
    vals = d[si, ii]
    order = np.argsort(vals, kind="stable")
    vals, si, ii = vals[order], si[order], ii[order]
    out = np.empty(n_resamples)
    for start, c, k in _draws(s, n, n_resamples, seed, chunk):
        r = len(c)
        w = c[:, si] * k[:, ii]  # [r, cells]
        cum = w.cumsum(1)
        total = cum[:, -1:] if cum.shape[1] else np.zeros((r, 1))
        at = (cum >= total / 2).argmax(1)
        out[start:start + r] = np.where(total[:, 0] > 0, vals[at] if len(vals) else np.nan, np.nan)
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, *, higher_is_better: bool = True, n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0, statistic: str = "mean") -> Difference:
    """mean (or median) of A - B with a paired bootstrap CI; a and b are [N] (one seed) or [S, N] on the
    same cells. The median suits heavy-tailed per-image values (a ratio whose denominator can be near 0).

    A cell that is NaN in either array is left out of both (e.g. a pointing game with an empty mask).
    """
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic={statistic!r} is not allowed: use 'mean' or 'median'")
    a, b = _as_grid(a, "a"), _as_grid(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a {a.shape} and b {b.shape} must be paired cell for cell (seeds x images)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    d = a - b
    keep = ~np.all(np.isnan(d), axis=0)  # images measured under no seed carry nothing
    d = d[:, keep]
    if d.size == 0 or np.all(np.isnan(d)):
        nan = float("nan")
        return Difference(nan, nan, nan, a.shape[0], 0, confidence, higher_is_better, NOT_MEASURED, statistic)
    draws = (bootstrap_means if statistic == "mean" else bootstrap_medians)(d, n_resamples=n_resamples, seed=seed)
    tail = (1 - confidence) / 2
    low, high = (float(q) for q in np.nanquantile(draws, [tail, 1 - tail]))
    point = np.nanmean(d) if statistic == "mean" else np.nanmedian(d)
    return Difference(float(point), low, high, d.shape[0], d.shape[1], confidence, higher_is_better,
                      verdict(low, high, higher_is_better), statistic)


__all__ = ["CONTRADICTED", "Difference", "INCONCLUSIVE", "NOT_MEASURED", "SUPPORTED", "VERDICTS",
           "bootstrap_means", "bootstrap_medians", "paired_difference", "verdict"]
