"""RESULTS.md's verdict rule (pipelines.results._verdict) in every branch, and the claim lines built from
per-image rows: hand-made rows with known per-seed means, so each expected difference is computed here."""

import numpy as np
import pandas as pd
import pytest

from pipelines import results


def test_verdict_branches_with_several_seeds():
    a, b = np.array([0.60, 0.62, 0.64]), np.array([0.40, 0.41, 0.42])  # stds 0.02 and 0.01
    v, d = results._verdict(a, b)
    assert v == results.SUPPORTED and d == pytest.approx(0.21)
    v, d = results._verdict(b, a)
    assert v == results.NOT_SUPPORTED and d == pytest.approx(-0.21)
    # lower is better: a higher mean is a worse one, and the sign of the difference follows the direction
    v, d = results._verdict(a, b, higher_is_better=False)
    assert v == results.NOT_SUPPORTED and d == pytest.approx(-0.21)
    v, d = results._verdict(b, a, higher_is_better=False)
    assert v == results.SUPPORTED and d == pytest.approx(0.21)
    # |diff| 0.02 <= 0.02 + 0.01: within the spread
    v, d = results._verdict(np.array([0.41, 0.43, 0.45]), np.array([0.40, 0.41, 0.42]))
    assert v == results.INCONCLUSIVE and d == pytest.approx(0.02)
    # the rule is "difference > sum of the stds": at the spread exactly it is still inconclusive
    v, _ = results._verdict(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 0.0]))
    assert v == results.SUPPORTED  # 2 > 1 + 0
    v, _ = results._verdict(np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.0, 0.0]))
    assert v == results.INCONCLUSIVE  # 1 <= 1 + 0


def test_verdict_one_seed_and_nothing_measured():
    assert results._verdict(np.array([0.5]), np.array([0.4]))[0] == "better" + results.ONE_SEED
    assert results._verdict(np.array([0.4]), np.array([0.5]))[0] == "not better" + results.ONE_SEED
    assert results._verdict(np.array([0.4]), np.array([0.5]), higher_is_better=False)[0] == \
        "better" + results.ONE_SEED
    v, d = results._verdict(np.array([]), np.array([0.5, 0.6]))
    assert v == results.NOT_MEASURED and np.isnan(d)


def _rows(mode: str, seed: int, method: str, n: int, **cols: float) -> pd.DataFrame:
    return pd.DataFrame({"idx": np.arange(n), "group": np.arange(n) % 2, "mode": mode, "seed": seed,
                         "method": method, "model": f"{mode}_s{seed}", **{k: np.full(n, v) for k, v in cols.items()}})


def test_claim_lines_from_per_image_rows():
    """SCAAT (002): Gini clearly higher (supported), deletion AUC clearly higher = worse (not supported; the line
    prints the raw difference, SCAAT minus ERM, beside "lower is better"),
    accuracy within the spread (inconclusive); 000: consistency's conflicting accuracy clearly higher."""
    parts = []
    for seed, (g_erm, g_sc, d_erm, d_sc, acc_erm, acc_sc, conf_cons) in enumerate(
            [(0.50, 0.70, 0.20, 0.40, 0.80, 0.81, 1.0), (0.51, 0.71, 0.21, 0.41, 0.82, 0.80, 1.0),
             (0.52, 0.72, 0.22, 0.42, 0.84, 0.85, 1.0)]):
        parts += [_rows("erm", seed, "saliency", 4, gini=g_erm, deletion_auc=d_erm),
                  _rows("scaat", seed, "saliency", 4, gini=g_sc, deletion_auc=d_sc),
                  _rows("erm", seed, "none", 4, correct=acc_erm),
                  _rows("scaat", seed, "none", 4, correct=acc_sc),
                  _rows("consistency", seed, "none", 4, correct=conf_cons),
                  _rows("erm", seed, "gradcam", 4, energy_pointing_game=0.3 + 0.01 * seed),
                  _rows("consistency", seed, "gradcam", 4, energy_pointing_game=0.3 + 0.01 * seed)]
    test = pd.concat(parts, ignore_index=True)
    lines = {line[4:7]: line for line in results._claim_lines(test, None, {})}
    assert lines["002"].endswith(
        f"Saliency Gini +0.200 → {results.SUPPORTED}; deletion AUC +0.200 (lower is better) → "
        f"{results.NOT_SUPPORTED}; accuracy {np.mean([0.81, 0.80, 0.85]) - np.mean([0.80, 0.82, 0.84]):+.3f} → "
        f"{results.INCONCLUSIVE}.")
    # erm's conflicting (group 1) accuracy per seed is its one value; consistency's is 1.0 with no spread
    conf = 1.0 - np.mean([0.80, 0.82, 0.84])
    assert lines["000"].endswith(f"Conflicting-group accuracy vs. ERM: {conf:+.3f} → {results.SUPPORTED}; "
                                 f"Grad-CAM EPG: +0.000 → {results.INCONCLUSIVE}.")
    assert "001" not in lines and "003" not in lines  # not measured: no line claims anything
