"""One smoke pipeline run shared by the tests (and the pytest-xdist workers) of a session."""

import os
import shutil
from pathlib import Path

import pytest

from tests._services import ROOT


def _smoke(base: Path) -> dict:
    """full.py's arguments for the smoke config with its store and MLflow database under ``base``."""
    db = f"sqlite:///{base / 'mlflow.db'}"
    args = ["--config", str(ROOT / "configs/smoke.yaml"), "--set", f"storage.uri={base / 'runs'}",
            "--set", f"tracking.uri={db}"]
    return {"base": base, "db": db, "args": args, "store": base / "runs" / "smoke"}


@pytest.fixture(scope="session")
def smoke_run(request, tmp_path_factory):
    """Run pipelines/full.py --config configs/smoke.yaml in-process against a fresh store and MLflow db,
    once per test session: under pytest-xdist the first worker that needs it runs it (on its own session
    Ray) while holding a lock, and the other workers wait for the lock and read the same files. Tests only
    read it; the ones that run more stages work on a copy (smoke_copy)."""
    import fcntl
    import json

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    base = shared / "smoke-shared"
    done = shared / "smoke-shared.json"  # written by the worker that ran it: how it ended
    with open(shared / "smoke-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not done.exists():
            from pipelines import full

            if base.exists():  # a worker died inside the run: start over
                shutil.rmtree(base)
            base.mkdir()
            try:
                request.getfixturevalue("ray_session")  # only the worker that runs it needs a Ray
                rc = full.main(_smoke(base)["args"])
            except BaseException as e:
                done.write_text(json.dumps({"rc": repr(e), "worker": worker}))
                raise
            done.write_text(json.dumps({"rc": rc, "worker": worker}))
    status = json.loads(done.read_text())
    assert status["rc"] == 0, f"the shared smoke run (worker {status['worker']}) ended with {status['rc']}"
    return _smoke(base)


@pytest.fixture
def smoke_copy(smoke_run, ray_session, tmp_path):
    """A copy of the shared smoke run's store and MLflow database, for tests that run more stages on it:
    the shared run itself stays as it was, so no test depends on the order the others ran in."""
    copy = _smoke(tmp_path / "smoke-copy")
    shutil.copytree(smoke_run["base"] / "runs", copy["base"] / "runs")
    shutil.copy2(smoke_run["base"] / "mlflow.db", copy["base"] / "mlflow.db")
    return copy
