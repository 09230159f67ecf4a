"""The smoke pipeline on a local Ray, read back from storage and from the MLflow store."""

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _client(db):
    from mlflow.tracking import MlflowClient

    return MlflowClient(db)


def test_stage_outputs_are_committed(smoke_run):
    store = smoke_run["store"]
    for stage in ("ingest", "train", "sweep", "evaluate", "report"):
        manifest = json.loads((store / stage / "_manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["config_hash"]
    ingest = json.loads((store / "ingest" / "_manifest.json").read_text())
    assert ingest["rows"] == {"train": 192, "val": 32, "test": 32, "dwsol": 16}
    for key in ("erm_s0", "consistency_s0", "scaat_s0"):
        assert (store / "train" / key / "model.pt").exists()
    assert (store / "report" / "report.html").stat().st_size > 10_000


def test_precompute_writes_every_sample_once_with_mean_one_weights(smoke_run):
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - tensor extension types

    rnd = smoke_run["store"] / "precompute" / "s0_round1"
    w = pq.read_table(rnd / "weights.parquet").to_pandas()
    assert sorted(w.idx) == list(range(192))
    assert w.w.mean() == pytest.approx(1.0, abs=1e-5)
    assert ((w.E >= 0) & (w.E <= 1 + 1e-6)).all()
    np.testing.assert_allclose(w.v, 1 - w.E, atol=1e-6)
    samples = pq.read_table(sorted((rnd / "samples").glob("*.parquet"))[0]).to_pandas()
    for col in ("background", "x_adv", "cam", "cam_adv", "E", "v"):
        assert col in samples.columns
    # the round's statistics by bias group, recomputed here from the weights, reach RESULTS.md
    conf = w.group == 1
    stats = json.loads((rnd / "_manifest.json").read_text())["stats"]
    assert stats["w_conflicting"] == pytest.approx(w.w[conf].mean(), rel=1e-5)
    assert stats["E_aligned"] == pytest.approx(w.E[~conf].mean(), rel=1e-5)
    row = (f"| 0 | 1 | {stats['E_aligned']:.3f} | {stats['E_conflicting']:.3f} | {stats['w_aligned']:.3f} | "
           f"{stats['w_conflicting']:.3f} | {w.w.max():.3f} |")
    assert row in (smoke_run["store"] / "report" / "RESULTS.md").read_text()


def test_evaluate_rows_cover_every_model_and_method(smoke_run):
    import pandas as pd
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401

    from pipelines.config import ROOT, load_config

    cfg = load_config(ROOT / "configs/smoke.yaml")
    files = sorted((smoke_run["store"] / "evaluate" / "test").glob("*.parquet"))
    df = pd.concat([pq.read_table(f, columns=["idx", "model", "method", "iou", "correct"]).to_pandas()
                    for f in files])
    assert set(df.model) == {"erm_s0", "consistency_s0", "scaat_s0"}
    assert set(df.method) == set(cfg.evaluate.methods) | {"none"}
    counts = df.groupby(["model", "method"]).idx.nunique()
    assert (counts == cfg.evaluate.n_test).all()  # every test sample exactly once per model x method


def test_mlflow_holds_parent_nested_runs_metrics_images_and_models(smoke_run):
    import mlflow

    client = _client(smoke_run["db"])
    exp = client.get_experiment_by_name("xai-ray-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["train.epochs"] == "2" and parent.data.tags["git_revision"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"ingest", "train", "sweep", "evaluate", "report"} <= set(children)
    by_parent = {}
    for r in runs:
        by_parent.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r.info.run_name)
    trials = by_parent[children["sweep"].info.run_id]
    assert len(trials) == 4  # 2 alphas x (tif, gradcam_thresholded)
    models = by_parent[children["train"].info.run_id]
    assert {"train/erm_s0", "train/consistency_s0", "train/scaat_s0"} <= set(models)
    erm = next(r for r in runs if r.info.run_name == "train/erm_s0")
    hist = client.get_metric_history(erm.info.run_id, "loss")
    assert [m.step for m in hist] == [1, 2]
    cons = next(r for r in runs if r.info.run_name == "train/consistency_s0")
    assert [m.step for m in client.get_metric_history(cons.info.run_id, "loss")] == [2]  # warm-up 1 + round 1
    assert "gradcam/iou" in " ".join(children["evaluate"].data.metrics)
    figures = [a.path for a in client.list_artifacts(children["report"].info.run_id, "figures")]
    assert "figures/heatmaps.png" in figures
    mlflow.set_tracking_uri(smoke_run["db"])
    model = mlflow.pytorch.load_model(f"runs:/{erm.info.run_id}/model")
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 6)
    versions = client.search_model_versions("name='smoke-erm_s0'")
    assert versions


def test_rerun_does_no_work_and_says_so(smoke_run, capsys):
    from pipelines import full

    before = (smoke_run["store"] / "evaluate" / "_manifest.json").read_text()
    assert full.main(smoke_run["args"]) == 0
    out = capsys.readouterr().out
    assert "Nothing to do" in out
    assert (smoke_run["store"] / "evaluate" / "_manifest.json").read_text() == before
    client = _client(smoke_run["db"])
    exp = client.get_experiment_by_name("xai-ray-smoke")
    parents = [r for r in client.search_runs([exp.experiment_id], max_results=500)
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # the same parent run, not a second one


def test_sweep_runs_alone_against_a_finished_run(smoke_run):
    from pipelines import sweep

    assert sweep.main(["--config", smoke_run["args"][1], *smoke_run["args"][2:], "--alphas", "0.25"]) == 0
    res = json.loads((smoke_run["store"] / "sweep" / "results.json").read_text())
    assert {r["alpha"] for r in res["rows"]} == {0.25} and res["best_alpha"] == 0.25


def test_bad_config_fails_before_ray_starts(capsys):
    from pipelines import full

    assert full.main(["--config", "configs/smoke.yaml", "--set", "train.epochz=1"]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err



def test_training_knob_sweep_with_asha(smoke_run):
    """Each trial trains through a TorchTrainer under Tune; ASHA may stop trials early; each is a nested run;
    afterwards every trial's worker placement group is gone (the next Ray Data stage gets its CPUs back)."""
    import ray
    import ray._private.state

    from pipelines import full

    args = smoke_run["args"] + ["--only", "sweep", "--force", "sweep", "--set", "sweep.train_mode=scaat",
                                "--set", "sweep.train_space={scaat.keep: [0.3, 0.6]}", "--set", "sweep.train_trials=2",
                                "--set", "sweep.train_epochs=2", "--set", "sweep.alphas=[0.5]"]
    assert full.main(args) == 0
    res = json.loads((smoke_run["store"] / "sweep" / "train_sweep.json").read_text())
    assert len(res["trials"]) == 2 and res["best"]["scaat.keep"] in (0.3, 0.6)
    assert all(1 <= t["epoch"] <= 2 and 0 <= t["val_acc"] <= 1 for t in res["trials"])
    manifest = json.loads((smoke_run["store"] / "sweep" / "_manifest.json").read_text())
    assert "train_sweep" in manifest["files"]
    runs = _client(smoke_run["db"]).search_runs(
        [_client(smoke_run["db"]).get_experiment_by_name("xai-ray-smoke").experiment_id],
        filter_string="tags.`xai.stage` = 'sweep'", max_results=100)
    assert any(r.info.run_name.startswith("sweep/train/scaat.keep=") for r in runs)
    live = [k for k, v in ray._private.state.state.placement_group_table().items() if v["state"] != "REMOVED"]
    assert live == []
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
