"""One local Ray instance for the whole integration session, and one smoke pipeline run shared by tests."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_run(ray_session, tmp_path_factory):
    """Run pipelines/full.py --config configs/smoke.yaml in-process against a fresh store and MLflow db."""
    from pipelines import full

    base = tmp_path_factory.mktemp("smoke")
    db = f"sqlite:///{base / 'mlflow.db'}"
    args = ["--config", str(ROOT / "configs/smoke.yaml"), "--set", f"storage.uri={base / 'runs'}",
            "--set", f"tracking.uri={db}"]
    rc = full.main(args)
    assert rc == 0
    yield {"base": base, "db": db, "args": args, "store": base / "runs" / "smoke"}
    shutil.rmtree(base, ignore_errors=True)
