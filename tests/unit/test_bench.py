"""The benchmark scripts stay runnable: each main runs once with --tiny (seconds) and writes sane JSON.

Timings are never asserted (DESIGN: tests never assert timings). The runs that can only show that every row
is there and every number is positive and finite are marked ``bench``: `make bench` runs them before the full
sizes, `make test` leaves them out. What `make test` keeps checks values: the Quantus agreement of bench.metrics,
the pass counts of bench.passes, and the timing helper's call order.
"""

import json
import math

import pytest


def _positive_finite(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.mark.bench
def test_attribution_tiny(tmp_path):
    from bench import attribution

    attribution.main(["--tiny", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "attribution_tiny.json").read_text())
    rows = data["rows"]
    expected = {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "gradcam_pp",
                "layercam", "tif", "gradcam_thresholded", "haf"}
    for model in ("small", "resnet18"):
        assert {r["method"] for r in rows if r["model"] == model} == expected
    assert {r["method"] for r in rows if r["model"] == "vit"} == {"gradcam", "layercam", "tif"}
    assert all(r["peers"] for r in rows if r["model"] == "vit")  # each beside pytorch-grad-cam
    assert len([r for r in rows if r["method"] == "tif"]) == 6  # two bases x three models
    for r in rows:
        assert _positive_finite(r["unit_s"]) and _positive_finite(r["ours_s"]) and _positive_finite(r["units"])
        for peer in r["peers"].values():
            assert _positive_finite(peer["median_s"]) and _positive_finite(peer["ours_over_peer"])
    peers = {p for r in rows for p in r["peers"]}
    assert {"Captum Saliency", "Captum IntegratedGradients", "Captum LayerGradCam",
            "pytorch-grad-cam GradCAM", "pytorch-grad-cam LayerCAM"} <= peers
    assert data["machine"]["threads"] == 1


def test_metrics_tiny(tmp_path):
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


@pytest.mark.bench
def test_stages_tiny(tmp_path):
    """The precompute actor pools and the plain loop; a Ray instance already up is reused and left up."""
    import ray

    from bench import stages

    own = not ray.is_initialized()
    if own:  # as the script would start it; the script must reuse it (and not shut it down)
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    try:
        stages.main(["--tiny", "--write", "--out-dir", str(tmp_path)])
        assert ray.is_initialized()
    finally:
        if own:
            ray.shutdown()
    data = json.loads((tmp_path / "stages_tiny.json").read_text())
    assert data["reused_ray"] is True
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"plain", "1 actor", "2 actors", "1 actor + write", "2 actors + write"}
    for r in rows.values():
        assert _positive_finite(r["median_s"]) and _positive_finite(r["images_per_s"])
        assert r["torch_threads"] == 1
    for key in ("1 actor", "2 actors", "1 actor + write", "2 actors + write"):
        assert rows[key]["actors"] == int(key[0]) and rows[key]["input_blocks"] >= 1
    assert rows["2 actors"]["input_blocks"] == 4  # one block per batch: 64 images, batch 16 (--tiny)
    # --tiny warms up (instrumented) the 1-actor pool only
    one = rows["1 actor"]
    assert _positive_finite(one["peak_rss_mib"]) and _positive_finite(one["warmup_pool_start_s"])
    assert _positive_finite(one["warmup_images_per_s_after_start"])
    assert {"plain_over_1_actor", "2_actors_over_1_actor"} <= set(data["ratios"])
    for ratio in data["ratios"].values():
        assert _positive_finite(ratio["value"]) and isinstance(ratio["met"], bool)


@pytest.mark.bench
def test_training_tiny(tmp_path):
    from bench import training

    training.main(["--tiny", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "training_tiny.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"erm", "consistency", "consistency_epoch_only", "consistency_precompute", "scaat"}
    for r in rows.values():
        assert _positive_finite(r["seconds"]) and _positive_finite(r["images_per_s"])
        assert _positive_finite(r["over_erm"]) and _positive_finite(r["peak_rss_mib"])
    assert rows["erm"]["over_erm"] == 1.0
    assert isinstance(rows["consistency"]["met"], bool) and isinstance(rows["scaat"]["met"], bool)
    assert set(data["children"]) == {"erm", "consistency", "scaat"}
    for child in data["children"].values():
        assert child["images"] == 128 and child["threads"] == 1
        assert all(math.isfinite(v) for v in child["last_epoch"].values())


def test_passes_tiny_counts_the_algorithms_passes(tmp_path):
    """The hook counts equal the pass counts derived from METHODS §5a/§5b for the quick config's steps."""
    from bench import passes

    data = passes.main(["--tiny", "--out-dir", str(tmp_path)])
    rows = {r["mode"]: r for r in data["rows"]}
    s, c = data["config"]["scaat_steps"], data["config"]["consistency_steps"]
    assert (rows["erm"]["forwards"], rows["erm"]["backwards"]) == (1, 1)
    assert (rows["scaat"]["forwards"], rows["scaat"]["backwards"]) == (s + 3, s + 3)
    assert (rows["consistency_precompute"]["forwards"], rows["consistency_precompute"]["backwards"]) == (c + 2, c)
    assert data["counts_match_algorithm"] and all(_positive_finite(r["x_erm_step"]) for r in rows.values())


@pytest.mark.bench
def test_reads_smoke_split(tmp_path):
    from bench import reads

    (row,) = reads.main(["--splits", "smoke", "--repeats", "1", "--out-dir", str(tmp_path)])["rows"]
    assert row["images"] == 192 and row["files"] == 2 and row["same_rows"]
    assert _positive_finite(row["driver_s"]) and _positive_finite(row["streamed_s"])


@pytest.mark.bench
def test_evaluate_tiny(tmp_path):
    from bench import evaluate

    data = evaluate.main(["--tiny", "--out-dir", str(tmp_path)])
    assert data["images"] == 16 and data["size"] == 32 and data["machine"]["threads"] == 1
    assert set(data["seconds"]) == {"all", "none", *data["methods"]} and len(data["methods"]) > 5
    assert all(_positive_finite(v) for v in data["seconds"].values()) and _positive_finite(data["rows_per_s"])
    assert data["rows_per_s"] == pytest.approx(16 * len(data["methods"]) / data["seconds"]["all"])


@pytest.mark.bench
def test_pass_size_tiny(tmp_path):
    from bench import pass_size

    rows = {r["call"]: r for r in pass_size.main(["--tiny", "--out-dir", str(tmp_path)])["rows"]}
    assert {"unit", "plain forwards", "ig ibs=None", "ig ibs=64", "deletion chunk=None",
            "deletion chunk=32"} <= set(rows)
    assert all(_positive_finite(r["units"]) for r in rows.values())


def test_measure_alternates_the_order_and_drops_the_warmup():
    from bench._timing import measure

    calls: list[str] = []
    out = measure({k: (lambda k=k: calls.append(k)) for k in "abc"}, repeats=2, warmup=1)
    assert "".join(calls) == "abccbaabc"
    assert all(len(v["times_s"]) == 2 and v["median_s"] >= 0 for v in out.values())


@pytest.mark.bench
def test_ingest_tiny(tmp_path):
    from bench import ingest

    data = ingest.main(["--tiny", "--out-dir", str(tmp_path)])
    assert [r["cpus"] for r in data["rows"]] == [1, 2] and all(r["images"] == 200 for r in data["rows"])
    assert all(_positive_finite(float(r[k])) for r in data["rows"]
               for k in ("images_per_s", "warm_images_per_s", "peak_driver_mib"))
    assert all(r["warm_images_per_s"] == pytest.approx(200 / r["warm_seconds"], rel=0.01) for r in data["rows"])


def test_evaluate_bench_configs_validate_with_the_paper_config():
    """Each side of bench.evaluate (every method, none, each alone) is a config EvalActor accepts: the paper
    config's mode_methods names saliency and Grad-CAM, which a one-method config would otherwise lack."""
    from bench.evaluate import only
    from pipelines.config import ROOT, Config, load_config

    cfg = load_config(ROOT / "configs/paper.yaml")
    assert cfg.evaluate.mode_methods  # the case that broke the bench
    for methods in ([], ["haf"], list(cfg.evaluate.methods)):
        c = Config.model_validate(only(cfg, methods))
        assert c.evaluate.methods == methods and c.evaluate.mode_methods == {}
        assert c.evaluate.haf_steps == cfg.evaluate.haf_steps and c.data.size == cfg.data.size


def test_value_gaps_per_column_and_method():
    """The largest |after - before| per value column and method, by hand; equal NaNs are no gap, a NaN on one
    side only is an infinite one; the key columns are not compared; other rows are an error."""
    import numpy as np

    from bench.evaluate import value_gaps

    method = np.array(["none", "gradcam", "gradcam", "tif"])
    before = {"col_method": method, "col_idx": np.array([0, 0, 1, 0]), "col_label": np.array([1, 1, 2, 1]),
              "col_pxap": np.array([np.nan, 0.5, 0.25, 0.75], np.float32),
              "col_gini": np.array([np.nan, 0.1, 0.2, 0.3]), "col_curve": np.array([[1.0, 0.5]] * 4),
              "times": np.array([1.0])}
    after = {**before, "col_pxap": np.array([np.nan, 0.5, 0.375, 0.5], np.float32),
             "col_gini": np.array([0.0, 0.1, 0.2, 0.3]), "col_label": np.array([9, 9, 9, 9]),
             "col_curve": np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.25], [1.0, 0.5]]), "times": np.array([2.0])}
    assert value_gaps(before, after) == {"pxap": {"gradcam": 0.125, "tif": 0.25}, "gini": {"none": np.inf},
                                         "curve": {"gradcam": 0.25}}
    assert value_gaps(before, before) == {}
    with pytest.raises(SystemExit, match="different rows"):
        value_gaps(before, {**after, "col_idx": np.array([0, 1, 1, 0])})


def test_evaluate_bench_alphas_from_text_or_a_sweep_manifest(tmp_path):
    from bench.evaluate import ALPHAS, _alphas

    assert _alphas(None) == ALPHAS
    assert _alphas('{"tif": 0.1}') == {"tif": 0.1}
    manifest = tmp_path / "_manifest.json"
    manifest.write_text(json.dumps({"stage": "sweep", "tuned": {"tif": 0.1, "haf:steps": 74, "haf:lr": 0.5}}))
    assert _alphas(str(manifest)) == {"tif": 0.1, "haf:steps": 74.0, "haf:lr": 0.5}
    with pytest.raises(SystemExit, match="neither a JSON file nor JSON text"):
        _alphas("tif=0.1")
    with pytest.raises(SystemExit, match="mapping of method"):
        _alphas('{"tif": "high"}')


@pytest.mark.bench
def test_evaluate_against_itself_tiny(tmp_path):
    """--against HEAD: the same code on both sides writes the same values, every one of them."""
    from bench import evaluate

    data = evaluate.main(["--tiny", "--against", "HEAD", "--out-dir", str(tmp_path)])
    assert data["value_gaps"] == {} and data["keys_before_lacks_at_default"] == []
    assert len(data["times_s"]["before"]) == len(data["times_s"]["after"]) == 1
    assert all(_positive_finite(v) for v in data["pair_ratios"])
