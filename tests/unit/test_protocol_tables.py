"""The report's protocol tables (pipelines.results) on evaluate rows built by hand."""

import numpy as np
import pandas as pd
import pytest

from pipelines.results import group_weighted_accuracy, pointing_game_table, wsol_table


def test_wsol_table_by_hand():
    """Image A's best box has IoU 1 at every level, image B's 0.6, image C has no box (NaN row): MaxBoxAcc is
    1 at IoU 0.3 and 0.5, 1/2 at 0.7; MaxBoxAccV2 = (1 + 1 + 0.5) / 3. Every bootstrap resample of {A, B}
    gives one of 1/3 x (2 + f) with f the share of A: the CI lies within [2/3, 1]."""
    lv = [np.full(256, 1.0), np.full(256, 0.6), np.full(256, np.nan)]
    rows = pd.DataFrame({"model": "erm_s0", "method": "gradcam", "idx": [0, 1, 2], "box_iou_levels": lv})
    none = pd.DataFrame({"model": "erm_s0", "method": "none", "idx": [0], "box_iou_levels": [np.full(256, np.nan)]})
    t = wsol_table(pd.concat([rows, none]))
    r = t.loc[("erm_s0", "gradcam")]
    assert (r["images"], r["MaxBoxAcc@30"], r["MaxBoxAcc@50"], r["MaxBoxAcc@70"]) == (2, 1.0, 1.0, 0.5)
    assert r["MaxBoxAccV2"] == pytest.approx(2.5 / 3)
    assert 2 / 3 <= r["CI95_low"] <= r["MaxBoxAccV2"] <= r["CI95_high"] <= 1.0
    assert wsol_table(rows.drop(columns="box_iou_levels")) is None


def test_wsol_table_takes_the_best_threshold_per_iou():
    """A: IoU 0.8 at levels < 128, 0.2 above; B: 0.2 below, 0.8 from 128: at any one threshold one image hits
    IoU 0.7, so MaxBoxAcc@70 = 1/2 (not 1, which picking a threshold per image would give)."""
    a = np.where(np.arange(256) < 128, 0.8, 0.2)
    rows = pd.DataFrame({"model": "m_s0", "method": "tif", "idx": [0, 1], "box_iou_levels": [a, a[::-1].copy()]})
    assert wsol_table(rows).loc[("m_s0", "tif")]["MaxBoxAcc@70"] == 0.5


def test_pointing_game_table_leaves_out_difficult_pairs_and_averages_classes():
    df = pd.DataFrame({"model": "erm_s0", "method": "gradcam", "label": [0, 0, 1, 1, 2],
                       "pointing_game_strict": [1.0, 0.0, 1.0, 1.0, 0.0], "difficult": [0.0, 0.0, 0.0, 1.0, 1.0]})
    r = pointing_game_table(df, 4).loc[("erm_s0", "gradcam")]
    assert r["pairs"] == 3 and r["class0"] == 0.5 and r["class1"] == 1.0
    assert np.isnan(r["class2"]) and np.isnan(r["class3"]) and r["mean_over_classes"] == 0.75


def test_group_weighted_accuracy_by_hand():
    """Test accuracy per group 1, 0.5, 0, 1 (groups 0-3); training shares 0.7, 0.1, 0.1, 0.1: the weighted
    average is 0.7 + 0.05 + 0 + 0.1 = 0.85; the plain mean over the 8 test images 5/8; the worst group 0."""
    df = pd.DataFrame({"model": "erm_s0", "method": "none", "group": [0, 0, 1, 1, 2, 2, 3, 3],
                       "correct": [1, 1, 1, 0, 0, 0, 1, 1]})
    train = np.array([0] * 7 + [1, 2, 3])
    r = group_weighted_accuracy(df, train).loc["erm_s0"]
    assert r["train_weighted_acc"] == pytest.approx(0.85) and r["mean_acc"] == 5 / 8 and r["worst_group_acc"] == 0
    assert group_weighted_accuracy(df.assign(group=-1), train) is None


def test_pointing_game_table_difficult_subset_column():
    """TorchRay's difficult subset: only flagged pairs, after the all-difficult ones are left out: class 0 has
    pairs (hit, flagged) and (miss, not flagged), class 1 (hit, flagged) and (hit, all-difficult, flagged)."""
    df = pd.DataFrame({"model": "erm_s0", "method": "gradcam", "label": [0, 0, 1, 1],
                       "pointing_game_strict": [1.0, 0.0, 0.0, 1.0], "difficult": [0.0, 0.0, 0.0, 1.0],
                       "difficult_subset": [1.0, 0.0, 1.0, 1.0]})
    r = pointing_game_table(df, 2).loc[("erm_s0", "gradcam")]
    assert r["pairs"] == 3 and r["mean_over_classes"] == 0.25  # class 0: 1/2, class 1: 0/1
    assert r["difficult_pairs"] == 2 and r["difficult_mean_over_classes"] == 0.5  # class 0: 1/1, class 1: 0/1
    assert "difficult_pairs" not in pointing_game_table(df.drop(columns="difficult_subset"), 2).columns


def test_wsss_table_reads_the_checks_summary():
    from pipelines.results import wsss_table

    summary = {"erm_s0": {"wsss_images_val": 10.0, "wsss_images_test": 20.0, "wsss_bg_threshold_gradcam": 0.3,
                          "wsss_val_miou_gradcam": 0.41, "wsss_miou_gradcam": 0.38, "wsss_miou_low_gradcam": 0.3,
                          "wsss_miou_high_gradcam": 0.45, "randomisation_gradcam_layer4": 0.2},
               "random_s0": {"randomisation_gradcam_layer4": 0.1}}
    t = wsss_table(summary)
    assert list(t.index) == [("erm_s0", "gradcam")]
    r = t.loc[("erm_s0", "gradcam")]
    assert (r["bg_threshold (val)"], r["test_mIoU"], r["CI95_low"], r["test_images"]) == (0.3, 0.38, 0.3, 20.0)
    assert wsss_table({"random_s0": {"randomisation_gradcam_layer4": 0.1}}) is None


def test_randomisation_notes_name_the_methods_whose_maps_turn_constant():
    from pipelines.results import _quantity, randomisation_notes

    nan = float("nan")
    summary = {  # two models; HAF's maps all constant once fc is re-drawn, Grad-CAM never constant
        "erm_s0": {"randomisation_gradcam_trained_constant": 0.0, "randomisation_gradcam_fc": 0.1,
                   "randomisation_gradcam_fc_constant": 0.0,
                   "randomisation_haf_trained_constant": 0.25, "randomisation_haf_fc": nan,
                   "randomisation_haf_fc_constant": 1.0, "randomisation_haf_conv1": 0.3,
                   "randomisation_haf_conv1_constant": 0.5},
        "erm_s1": {"randomisation_gradcam_trained_constant": 0.0, "randomisation_gradcam_fc": 0.2,
                   "randomisation_gradcam_fc_constant": 0.0,
                   "randomisation_haf_trained_constant": 0.75, "randomisation_haf_fc": nan,
                   "randomisation_haf_fc_constant": 1.0, "randomisation_haf_conv1": nan,
                   "randomisation_haf_conv1_constant": 1.0},
    }
    lines = randomisation_notes(summary, 64)
    notes = [line for line in lines if line.startswith("- ")]
    assert notes == ["- haf: its map is constant on 50% of the 64 images on the trained models and, after "
                     "re-initialising, on 75% (conv1), 100% (fc) (mean over the models). The Spearman is undefined "
                     "on every model for fc: a map that turns constant when the weights are re-drawn does depend "
                     "on them, but no rank correlation says how much."]
    assert randomisation_notes({"erm_s0": summary["erm_s0"] | {"randomisation_haf_trained_constant": 0.0,
                                                              "randomisation_haf_fc_constant": 0.0,
                                                              "randomisation_haf_conv1_constant": 0.0}}, 64) == []
    assert _quantity("detection_images_eps2", 300.0) == "300" and _quantity("detection_auroc_haf_eps2", 0.5) == "0.500"
