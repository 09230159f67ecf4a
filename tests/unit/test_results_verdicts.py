"""RESULTS.md's claim lines (pipelines.results) built from per-image rows: hand-made rows whose paired
differences are known, so each expected difference, interval and verdict is computed here."""

import re

import numpy as np
import pandas as pd
import pytest

from pipelines import results
from xai_core import stats


def _rows(mode: str, seed: int, method: str, n: int, **cols) -> pd.DataFrame:
    # odd images bias-conflicting: class 0 on background 1 (group = bias on biased_shapes)
    return pd.DataFrame({"idx": np.arange(n), "group": np.arange(n) % 2, "label": 0, "background": np.arange(n) % 2,
                         "mode": mode, "seed": seed,
                         "method": method, "model": f"{mode}_s{seed}",
                         **{k: np.broadcast_to(v, n).astype(float) for k, v in cols.items()}})


def _claims(n: int = 40) -> dict[str, str]:
    """3 seeds x n images. SCAAT vs ERM: Gini +0.2 on every image (supported); deletion AUC minus the model's
    random-order one +0.25, higher is worse (contradicted); accuracy: the same number of right answers on other
    images (inconclusive).
    Consistency: conflicting images all right, ERM's all wrong (supported)."""
    rng = np.random.default_rng(0)
    parts = []
    for seed in range(3):
        base = rng.uniform(0.3, 0.5, n)
        erm_right = (np.arange(n) % 4 < 2).astype(float)
        # each model's random-order deletion AUC differs (base + 0.1, and + 0.05 for SCAAT): the claim compares
        # deletion minus it, (base + 0.2 - base - 0.05) - (base - base - 0.1) = +0.25
        parts += [_rows("erm", seed, "saliency", n, gini=base, deletion_auc=base, deletion_auc_random=base + 0.1),
                  _rows("scaat", seed, "saliency", n, gini=base + 0.2, deletion_auc=base + 0.2,
                        deletion_auc_random=base + 0.05),
                  _rows("erm", seed, "none", n, correct=erm_right * (np.arange(n) % 2 == 0)),
                  _rows("scaat", seed, "none", n, correct=np.roll(erm_right * (np.arange(n) % 2 == 0), 2)),
                  _rows("consistency", seed, "none", n, correct=np.arange(n) % 2 == 1),
                  _rows("erm", seed, "gradcam", n, energy_pointing_game=base),
                  _rows("consistency", seed, "gradcam", n, energy_pointing_game=base)]
    test = pd.concat(parts, ignore_index=True)
    return {line[4:7]: line for line in results._claim_lines(test, None, {})}


def test_claim_lines_print_each_difference_with_its_ci_and_verdict():
    lines = _claims()
    assert "001" not in lines and "003" not in lines  # not measured: no line claims anything
    assert "saliency Gini, SCAAT vs. ERM: +0.200 [95% CI +0.200, +0.200; 3 seed(s) x 40 images] → supported" \
        in lines["002"]
    assert ("saliency deletion AUC minus the model's random-order one, SCAAT vs. ERM: +0.250 [95% CI +0.250, +0.250; "
            "3 seed(s) x 40 images, lower is better] → contradicted") in lines["002"]
    acc = re.search(r"accuracy, SCAAT vs\. ERM: ([+-]\d\.\d+) \[95% CI ([+-]\d\.\d+), ([+-]\d\.\d+);", lines["002"])
    assert float(acc.group(1)) == 0.0 and float(acc.group(2)) < 0 < float(acc.group(3))
    assert lines["002"].endswith("→ inconclusive.")
    # conflicting group (odd idx): consistency right on all, ERM on none
    assert "conflicting-group accuracy, consistency vs. ERM: +1.000 [95% CI +1.000, +1.000; 3 seed(s) x 20 images]" \
        " → supported" in lines["000"]
    assert "Grad-CAM EPG, consistency vs. ERM: +0.000 [95% CI +0.000, +0.000" in lines["000"]
    assert results.claim_verdicts("\n".join(lines.values())) == {
        "000": ["supported", "inconclusive", "inconclusive"],
        "002": ["supported", "contradicted", "inconclusive"]}


def test_paired_uses_only_the_cells_both_were_measured_on():
    a = pd.concat([_rows("scaat", s, "saliency", 6, gini=1.0) for s in (0, 1)])
    b = pd.concat([_rows("erm", s, "saliency", 4, gini=0.5) for s in (1, 2)])  # seed 1, images 0-3 in both
    res = results.paired(pd.concat([a, b]), "gini", {"mode": "scaat"}, {"mode": "erm"})
    assert (res.diff, res.n_seeds, res.n_items, res.verdict) == (0.5, 1, 4, stats.SUPPORTED)
    none = results.paired(a, "gini", {"mode": "scaat"}, {"mode": "erm"})
    assert none.verdict == stats.NOT_MEASURED and none.text() == "→ not measured"


def test_the_interval_resamples_seeds_too():
    """Seed 0 gains +0.3 on every image, seed 1 loses 0.1: one seed's images alone give a zero-width CI;
    resampling seeds spreads it over [-0.1, +0.3]."""
    df = pd.concat([_rows("scaat", 0, "saliency", 30, gini=0.8), _rows("erm", 0, "saliency", 30, gini=0.5),
                    _rows("scaat", 1, "saliency", 30, gini=0.4), _rows("erm", 1, "saliency", 30, gini=0.5)])
    res = results.paired(df, "gini", {"mode": "scaat"}, {"mode": "erm"})
    assert res.diff == pytest.approx(0.1) and res.low == pytest.approx(-0.1) and res.high == pytest.approx(0.3)
    assert res.verdict == stats.INCONCLUSIVE


def test_worst_group_is_over_class_background_groups_with_enough_images():
    # class 0 on background 0: 20 images, 10 right; class 1 on background 1: 25 images, all right;
    # class 2 on background 0: 5 images, none right (too few to count)
    label = np.array([0] * 20 + [1] * 25 + [2] * 5)
    bg = np.array([0] * 20 + [1] * 25 + [0] * 5)
    correct = np.r_[np.arange(20) % 2, np.ones(25), np.zeros(5)]
    acc = pd.DataFrame({"seed": 0, "label": label, "background": bg, "correct": correct})
    assert results._worst_group(acc, 6).tolist() == [0.5]
    assert results._worst_group(acc.assign(background=-1), 6).size == 0  # data without backgrounds


def test_tif_and_haf_lines_name_every_comparator():
    """003: TIF's PxAP against each control present (TIF +0.1 over tif_fusion_only on every image: supported;
    equal to gradcam: inconclusive). 001: medians of the paired false-response differences (HAF one image
    with a huge ratio, the rest 0.2 below Grad-CAM: the median says supported), and the detection AUROCs."""
    n = 30
    base = np.linspace(0.2, 0.6, n)
    test = pd.concat([_rows("erm", 0, "tif", n, pxap=base + 0.1, energy_pointing_game=base),
                      _rows("erm", 0, "tif_fusion_only", n, pxap=base, energy_pointing_game=base + 0.05),
                      _rows("erm", 0, "gradcam", n, pxap=base + 0.1), _rows("erm", 0, "none", n, correct=1.0)])
    fr = np.full(n, 0.3)
    fr[0] = 50.0
    dwsol = pd.concat([_rows("erm", 0, "haf", n, false_response=fr),
                       _rows("erm", 0, "gradcam", n, false_response=np.full(n, 0.5))])
    summary = {"erm_s0": {"detection_auroc_haf_eps8": 0.75, "detection_low_haf_eps8": 0.6,
                          "detection_high_haf_eps8": 0.9, "detection_images_eps8": 40.0}}
    lines = {line[4:7]: line for line in results._claim_lines(test, dwsol, summary)}
    assert ("PxAP, TIF vs. tif_fusion_only (ERM models): +0.100 [95% CI +0.100, +0.100; 1 seed(s) x 30 images] "
            "→ supported") in lines["003"]
    assert "PxAP, TIF vs. gradcam (ERM models): +0.000 [95% CI +0.000, +0.000" in lines["003"]
    assert "EPG, TIF vs. tif_fusion_only: -0.050 [95% CI -0.050, -0.050" in lines["003"]
    assert ("false response, haf vs. gradcam: -0.200 [95% CI -0.200, -0.200; 1 seed(s) x 30 images, lower is better, "
            "median of the paired differences] → supported") in lines["001"]
    assert "erm_s0 at 8/255 (40 images): haf 0.750 [0.600, 0.900]" in lines["001"]


def test_conflicting_means_background_not_class_whatever_the_dataset_groups():
    """Waterbirds: group = 2 y + place (0-3); bias-conflicting = y != place (groups 1 and 2), not group 1."""
    df = pd.DataFrame({"label": [0, 0, 1, 1, 0], "background": [0, 1, 0, 1, -1], "group": [0, 1, 2, 3, -1]})
    assert results.with_bias(df).bias.tolist() == [0, 1, 1, 0, -1]
