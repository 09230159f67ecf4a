"""S3 faults against a local moto server: a lost endpoint, a missing bucket, an unreachable endpoint. (The whole
pipeline on S3, with `mlflow server` and a rerun, is the job of tests/e2e/test_job_submit.py.)"""

import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests._services import ROOT, S3_TEST_ENV, bucket_keys, free_port

SMOKE = str(ROOT / "configs/smoke.yaml")
def test_ray_workers_see_the_test_credentials(ray_session, moto_s3):
    """Workers sign S3 requests with their own environment (Ray's start), not the driver's os.environ."""
    @ray_session.remote
    def env():
        return {k: os.environ.get(k) for k in S3_TEST_ENV}

    assert ray_session.get(env.remote()) == S3_TEST_ENV


def _read_back(client, bucket: str, key: str) -> dict:
    """A Parquet object fetched with boto3 and decoded with pyarrow: what a reader of the bucket gets."""
    import io

    import pyarrow.parquet as pq

    from tests._arrow import numpy_columns

    return numpy_columns(pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())))


def _ingest_args(proxy, bucket: str, db: Path, driver_io_mb: float = 0.0) -> tuple[list[str], list[str]]:
    """driver_io_mb=0: the splits go through Ray Data's Parquet writer (the path of splits above the limit)."""
    overrides = [f"storage.uri=s3://{bucket}/lost", f"storage.s3_endpoint={proxy.endpoint}",
                 f"storage.driver_io_mb={driver_io_mb}",
                 "data.rows_per_shard=48"]  # 4 + 1 + 1 + 1 files: a cut at the third falls inside the writes
    return overrides, ["--config", SMOKE, "--only", "ingest", *[a for c in (
        *overrides, f"tracking.uri=sqlite:///{db}") for a in ("--set", c)]]


def test_endpoint_lost_during_the_drivers_parquet_writes_commits_nothing(ray_session, moto_s3, tmp_path, capsys):
    """Small splits are written by the driver (pyarrow): the endpoint goes away for good as the third upload
    starts; the run fails naming the stage's path, part of the files are in the bucket, no manifest."""
    from pipelines import full, ingest
    from pipelines import storage as st
    from pipelines.config import load_config
    from tests._proxy import CuttableProxy

    bucket, client = moto_s3["bucket"], moto_s3["client"]
    proxy = CuttableProxy(moto_s3["port"], cut_at=3)
    overrides, args = _ingest_args(proxy, bucket, tmp_path / "driver.db", driver_io_mb=256.0)
    try:
        assert full.main(args) == 1
        err = capsys.readouterr().err
        assert proxy.outages == 1 and "error: " in err and "lost/smoke/ingest/" in err, err[-3000:]
        keys = bucket_keys(client, bucket, "lost/smoke/ingest/")
        assert sorted(k for k in keys if k.endswith(".parquet")) == ["train/part-00000.parquet",
                                                                      "train/part-00001.parquet"], sorted(keys)
        assert "_manifest.json" not in keys
        cfg = load_config(SMOKE, [*overrides, f"storage.s3_endpoint={moto_s3['endpoint']}"])
        assert st.committed(st.from_config(cfg), ingest.STAGE, ingest.config_hash(cfg)) is None
    finally:
        proxy.close()


@pytest.mark.slow
def test_endpoint_lost_during_the_parquet_writes_commits_nothing_then_an_outage_is_ridden_out(
        ray_session, moto_s3, tmp_path, capsys):
    """The endpoint (a proxy in front of moto) goes away as the third Parquet upload of ingest (through Ray
    Data's writer) starts. For good (Ray Data's retries of network errors off): the run fails, two files are
    in the bucket and no manifest. For a few seconds (Ray Data's default retries on): the rerun rides it out
    and commits. Every split read back from the bucket then equals the dataset generated here directly."""
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
        keys = bucket_keys(client, bucket, "lost/smoke/ingest/")
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
    keys = bucket_keys(client, bucket, "lost/smoke/")
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
