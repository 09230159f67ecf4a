"""The pipeline against an S3 endpoint (a local moto server): outputs, reruns, a lost endpoint, a missing bucket."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import ROOT, S3_TEST_ENV, free_port

SMOKE = str(ROOT / "configs/smoke.yaml")
# The smoke config cut to one model and one method: every stage still runs (sweep off, as it only tunes tif).
REDUCED = ["--set", "train.modes=[erm]", "--set", "sweep.enabled=false", "--set", "evaluate.methods=[gradcam]",
           "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0",
           "--set", "evaluate.random_baseline=false", "--set", "evaluate.n_accuracy=16"]


def _keys(client, bucket, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def test_ray_workers_see_the_test_credentials(ray_session, moto_s3):
    """Workers sign S3 requests with their own environment (Ray's start), not the driver's os.environ."""
    @ray_session.remote
    def env():
        import os
        return {k: os.environ.get(k) for k in S3_TEST_ENV}

    assert ray_session.get(env.remote()) == S3_TEST_ENV


@pytest.fixture
def mlflow_server_s3(moto_s3, tmp_path):
    """`mlflow server` on a free loopback port, runs in SQLite, artifacts proxied to the moto bucket."""
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_s3["endpoint"]}
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", f"s3://{moto_s3['bucket']}/mlflow-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # seconds on an idle box; minutes when the box is busy
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "mlflow-server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.mark.slow
def test_pipeline_on_s3_commits_everything_in_the_bucket_and_reruns_as_no_op(ray_session, moto_s3, mlflow_server_s3,
                                                                              capsys):
    """Stage outputs and Ray checkpoints in the bucket; MLflow through `mlflow server` whose artifact store
    (figures, report, logged model) is the same S3 endpoint."""
    from mlflow.tracking import MlflowClient

    from pipelines import full

    bucket, client = moto_s3["bucket"], moto_s3["client"]
    args = ["--config", SMOKE, *REDUCED, "--set", f"storage.uri=s3://{bucket}/runs",
            "--set", f"storage.s3_endpoint={moto_s3['endpoint']}", "--set", f"tracking.uri={mlflow_server_s3}"]
    assert full.main(args) == 0
    out = capsys.readouterr().out
    assert f"Outputs: s3://{bucket}/runs/smoke" in out
    keys = _keys(client, bucket, "runs/smoke/")
    for stage in ("ingest", "train", "train/erm_s0", "evaluate", "report"):
        assert f"{stage}/_manifest.json" in keys, sorted(keys)
    for split in ("train", "val", "test", "dwsol"):
        assert any(k.startswith(f"ingest/{split}/") and k.endswith(".parquet") for k in keys), split
    assert any(k.startswith("evaluate/test/") and k.endswith(".parquet") for k in keys)
    assert "train/erm_s0/model.pt" in keys and "report/report.html" in keys
    assert any(k.startswith("ray/") and k.endswith("/state.pt") for k in keys), "Ray Train checkpoints on S3"
    assert not any(k.startswith(("sweep/", "precompute/")) for k in keys)
    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/smoke/evaluate/_manifest.json")["Body"].read())
    assert manifest["rows"] == {"test": 16 * 2, "dwsol": 8}  # n_test x (gradcam + none); n_dwsol x gradcam
    html = client.get_object(Bucket=bucket, Key="runs/smoke/report/report.html")["Body"].read()
    assert len(html) > 5_000

    artifacts = _keys(client, bucket, "mlflow-artifacts/")
    assert any(k.endswith("/report.html") for k in artifacts), sorted(artifacts)[:20]
    assert any(k.endswith(".png") for k in artifacts), "report figures in the S3 artifact store"
    assert any("/model" in k or "models/" in k for k in artifacts), "the logged model in the S3 artifact store"
    ml = MlflowClient(mlflow_server_s3)
    exp = ml.get_experiment_by_name("xai-ray-smoke")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    (erm,) = ml.search_runs([exp.experiment_id], filter_string="tags.`xai.model` = 'erm_s0'")
    assert [m.step for m in ml.get_metric_history(erm.info.run_id, "loss")] == [1, 2]

    assert full.main(args) == 0
    assert "Nothing to do" in capsys.readouterr().out
    again = json.loads(client.get_object(Bucket=bucket, Key="runs/smoke/evaluate/_manifest.json")["Body"].read())
    assert again == manifest


def _read_back(client, bucket: str, key: str) -> dict:
    """A Parquet object fetched with boto3 and decoded with pyarrow: what a reader of the bucket gets."""
    import io

    import pyarrow.parquet as pq

    from tests._arrow import numpy_columns

    return numpy_columns(pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())))


def _ingest_args(proxy, bucket: str, db: Path) -> tuple[list[str], list[str]]:
    overrides = [f"storage.uri=s3://{bucket}/lost", f"storage.s3_endpoint={proxy.endpoint}",
                 "data.rows_per_shard=48"]  # 4 + 1 + 1 + 1 files: a cut at the third falls inside the writes
    return overrides, ["--config", SMOKE, "--only", "ingest", *[a for c in (
        *overrides, f"tracking.uri=sqlite:///{db}") for a in ("--set", c)]]


@pytest.mark.slow
def test_endpoint_lost_during_the_parquet_writes_commits_nothing_then_an_outage_is_ridden_out(
        ray_session, moto_s3, tmp_path, capsys):
    """The endpoint (a proxy in front of moto) goes away as the third Parquet upload of ingest starts.
    For good (Ray Data's retries of network errors off): the run fails, two files are in the bucket and no
    manifest. For a few seconds (Ray Data's default retries on): the rerun rides it out and commits. Every
    split read back from the bucket then equals the dataset generated here directly."""
    import threading

    import ray.data

    from pipelines import full, ingest
    from pipelines import storage as st
    from pipelines.config import load_config
    from tests._proxy import CuttableProxy
    from xai_core.data.synthetic import BiasedShapes

    bucket, client = moto_s3["bucket"], moto_s3["client"]
    ctx = ray.data.DataContext.get_current()
    retried = ctx.retried_io_errors
    proxy = CuttableProxy(moto_s3["port"], cut_at=3)
    overrides, args = _ingest_args(proxy, bucket, tmp_path / "lost.db")
    try:
        ctx.retried_io_errors = []  # the driver's DataContext travels with the dataset to its write tasks
        assert full.main(args) == 1
        err = capsys.readouterr().err
        assert proxy.outages == 1 and "error: " in err and "lost/smoke/ingest/" in err, err[-3000:]
        keys = _keys(client, bucket, "lost/smoke/ingest/")
        written = sorted(k for k in keys if k.endswith(".parquet"))
        assert 2 <= len(written) < 7 and "_manifest.json" not in keys, sorted(keys)  # part of the data, no commit
        cfg = load_config(SMOKE, [*overrides, f"storage.s3_endpoint={moto_s3['endpoint']}"])  # not the lost one
        store = st.from_config(cfg)
        assert st.committed(store, ingest.STAGE, ingest.config_hash(cfg)) is None
    finally:
        ctx.retried_io_errors = retried
        proxy.close()

    proxy = CuttableProxy(moto_s3["port"], cut_at=3)  # the rerun's endpoint goes away at the same point
    overrides, args = _ingest_args(proxy, bucket, tmp_path / "lost.db")
    def back_after_3_s() -> None:
        if proxy.cut.wait(300):  # bounds a hang only
            time.sleep(3)
            proxy.restore()

    back = threading.Thread(target=back_after_3_s, daemon=True)
    back.start()
    try:
        assert full.main(args) == 0, capsys.readouterr().err[-3000:]
        # the outage happened, and was over before the commit
        assert proxy.outages == 1 and not back.is_alive(), (proxy.seen, proxy.log[:40])
        cfg = load_config(SMOKE, [*overrides, f"storage.s3_endpoint={moto_s3['endpoint']}"])
        store = st.from_config(cfg)
        manifest = st.committed(store, ingest.STAGE, ingest.config_hash(cfg))
        assert manifest is not None and manifest["rows"] == {"train": 192, "val": 32, "test": 32, "dwsol": 16}
    finally:
        proxy.close()

    d = cfg.data
    kw = {"size": d.size, "num_classes": d.num_classes}
    expected = {"train": BiasedShapes(n=d.n_train, seed=d.seed, split="train", bias=d.bias, **kw),
                "val": BiasedShapes(n=d.n_val, seed=d.seed + 1, split="test", **kw),
                "test": BiasedShapes(n=d.n_test, seed=d.seed, split="test", **kw),
                "dwsol": BiasedShapes(n=d.n_dwsol, seed=d.seed, split="dwsol", **kw)}
    keys = _keys(client, bucket, "lost/smoke/")
    for split, ds in expected.items():
        files = manifest["files"][split]
        assert files and all(f in keys for f in files)
        parts = [_read_back(client, bucket, f"lost/smoke/{f}") for f in files]
        got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        want = ds.arrays()
        np.testing.assert_array_equal(got["idx"], np.arange(len(ds)))  # every row once, in order
        assert set(got) == set(want) | {"idx"}
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{split}.{k}")


@pytest.mark.timeout(120)  # bounds a hang: a client retrying an absent bucket
def test_missing_bucket_fails_before_any_work(moto_s3, tmp_path, capsys):
    from pipelines import full

    db = tmp_path / "mlflow.db"
    rc = full.main(["--config", SMOKE, "--set", "storage.uri=s3://no-such-bucket-xai/runs",
                    "--set", f"storage.s3_endpoint={moto_s3['endpoint']}", "--set", f"tracking.uri=sqlite:///{db}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "S3 bucket s3://no-such-bucket-xai does not exist" in err and moto_s3["endpoint"] in err
    assert not db.exists()  # failed before the tracking store (and Ray) were touched


@pytest.mark.timeout(120)  # bounds a hang: the S3 client's own retries
def test_unreachable_endpoint_names_bucket_and_endpoint(moto_s3):
    from pipelines.storage import Storage

    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=rf"s3://{moto_s3['bucket']} cannot be reached \(endpoint {endpoint}\)"):
        Storage(f"s3://{moto_s3['bucket']}/runs/x", endpoint)
