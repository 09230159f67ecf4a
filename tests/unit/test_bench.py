"""The benchmark scripts stay runnable: each main runs once with --tiny (seconds) and writes sane JSON.

Timings are never asserted (DESIGN: tests never assert timings); only that every row is there and
every number is positive and finite.
"""

import json
import math

import pytest

pytest.importorskip("captum")
pytest.importorskip("pytorch_grad_cam")


def _positive_finite(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_attribution_tiny(tmp_path):
    from bench import attribution

    attribution.main(["--tiny", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "attribution_tiny.json").read_text())
    rows = data["rows"]
    expected = {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "gradcam_pp",
                "layercam", "tif", "gradcam_thresholded", "haf"}
    for model in ("small", "resnet18"):
        assert {r["method"] for r in rows if r["model"] == model} == expected
    assert len([r for r in rows if r["method"] == "tif"]) == 4  # two bases x two models
    for r in rows:
        assert _positive_finite(r["unit_s"]) and _positive_finite(r["ours_s"]) and _positive_finite(r["units"])
        for peer in r["peers"].values():
            assert _positive_finite(peer["median_s"]) and _positive_finite(peer["ours_over_peer"])
    peers = {p for r in rows for p in r["peers"]}
    assert {"Captum Saliency", "Captum IntegratedGradients", "Captum LayerGradCam",
            "pytorch-grad-cam GradCAM", "pytorch-grad-cam LayerCAM"} <= peers
    assert data["machine"]["threads"] == 1


def test_metrics_tiny(tmp_path):
    pytest.importorskip("quantus")  # in the [bench] extra, not in [test]
    from bench import metrics

    metrics.main(["--tiny", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "metrics_tiny.json").read_text())["rows"]
    assert [r["metric"] for r in rows] == ["deletion curve (AUC)", "pointing_game", "gini", "model_randomisation"]
    for r in rows:
        assert _positive_finite(r["ours_s"]) and _positive_finite(r["quantus_s"]) and _positive_finite(r["speedup"])
        assert math.isfinite(r["max_abs_diff"]) and r["max_abs_diff"] >= 0
    by = {r["metric"]: r for r in rows}
    # Matching settings give matching values (the agreement the table reports).
    assert by["deletion curve (AUC)"]["max_abs_diff"] < 1e-5
    assert by["pointing_game"]["max_abs_diff"] == 0
    assert by["model_randomisation"]["max_abs_diff"] < 1e-5
