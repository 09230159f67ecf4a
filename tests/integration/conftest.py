"""One local Ray instance for the whole integration session, and one smoke pipeline run shared by tests."""

import logging
import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Test credentials for the moto S3 endpoint: set in the driver by `moto_s3` and given to every worker of
# the session's Ray (runtime_env) so that workers sign requests as they would against a real S3. Ray
# workers take their environment from Ray's start, not from later os.environ changes in the driver.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
S3_TEST_BUCKET = "xai-test-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    if not ray.is_initialized():
        # address="local": a new instance even if `ray start` left /tmp/ray/ray_current_cluster behind
        # the dashboard serves the state API Ray Train's placement-group cleaner needs (see full.init_ray)
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **S3_TEST_ENV}})
    yield ray
    ray.shutdown()


def _smoke(base: Path) -> dict:
    """full.py's arguments for the smoke config with its store and MLflow database under ``base``."""
    db = f"sqlite:///{base / 'mlflow.db'}"
    args = ["--config", str(ROOT / "configs/smoke.yaml"), "--set", f"storage.uri={base / 'runs'}",
            "--set", f"tracking.uri={db}"]
    return {"base": base, "db": db, "args": args, "store": base / "runs" / "smoke"}


@pytest.fixture(scope="session")
def smoke_run(ray_session, tmp_path_factory):
    """Run pipelines/full.py --config configs/smoke.yaml in-process against a fresh store and MLflow db."""
    from pipelines import full

    run = _smoke(tmp_path_factory.mktemp("smoke"))
    assert full.main(run["args"]) == 0
    yield run
    shutil.rmtree(run["base"], ignore_errors=True)


@pytest.fixture
def smoke_copy(smoke_run, tmp_path):
    """A copy of the shared smoke run's store and MLflow database, for tests that run more stages on it:
    the shared run itself stays as it was, so no test depends on the order the others ran in."""
    copy = _smoke(tmp_path / "smoke-copy")
    shutil.copytree(smoke_run["base"] / "runs", copy["base"] / "runs")
    shutil.copy2(smoke_run["base"] / "mlflow.db", copy["base"] / "mlflow.db")
    return copy


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on a free local port with one bucket; test credentials in the environment.

    moto keeps its state per process, not per server: a second ThreadedMotoServer started by a test sees
    the same buckets (tests use that to stop and restart an endpoint without touching this one).
    """
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=S3_TEST_BUCKET)
    yield {"endpoint": endpoint, "port": port, "bucket": S3_TEST_BUCKET, "client": client}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
