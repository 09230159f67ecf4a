import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests._services import S3_TEST_BUCKET, S3_TEST_ENV, free_port

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s by default, and each fit waits on several polls: at
# 0.25 s a one-worker fit of the smoke data took 20 s instead of 22 s here. Set before any Ray starts, so
# the session's Ray, the subprocess drivers and the `ray start` nodes of the e2e test all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# The longest chains first. `make test` runs two pytest-xdist workers that take whole files
# (--dist loadfile) in this order: one starts the fault runs (their own Ray in a subprocess) while the other
# runs the shared smoke pipeline and the tests that read it (tests/integration/conftest.py shares the
# smoke run between the workers), then the e2e cluster and S3 files, then the short files as workers free up.
FIRST = ("tests/integration/test_faults.py::test_killed_worker_actors_and_driver_end_as_the_uninterrupted_run",
         "tests/integration/test_pipeline.py", "tests/e2e/test_job_submit.py", "tests/integration/test_s3.py")


def pytest_collection_modifyitems(session, config, items):  # noqa: ANN001, ANN201 - pytest hook
    def rank(item) -> int:  # noqa: ANN001
        return next((i for i, p in enumerate(FIRST) if item.nodeid.startswith(p)), len(FIRST))

    items.sort(key=rank)  # stable: the rest keep their collection order


# ------------------------------------------------------------------ services shared by every test directory
@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test process (each pytest-xdist worker has its own)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    if not ray.is_initialized():
        # address="local": a new instance even if `ray start` left /tmp/ray/ray_current_cluster behind
        # the dashboard serves the state API Ray Train's placement-group cleaner needs (see full.init_ray)
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **S3_TEST_ENV}})
    yield ray
    ray.shutdown()


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
