"""What reaches MLflow: params and tags with secrets redacted, read back from a real SQLite store; a bad
config fails before Ray (or MLflow) is even imported."""

import subprocess
import sys

from pipelines.config import ROOT
from pipelines.tracking import REDACTED, Tracker


def test_params_and_tags_are_redacted_in_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "redaction")
    run = tracker.find_or_create("r", {"xai.stage": "t"})
    tracker.log_params(run, {"storage": {"uri": "s3://bucket/runs", "aws_secret_access_key": "s3cr3t-key"},
                             "tracking": {"uri": "http://alice:pa55word@mlflow.example:5000/x"},
                             "db": {"password": "hunter2", "port": 5432, "token": ""}, "train": {"lr": 0.001}})
    tracker.set_tags(run, {"storage": "https://bob:t0ps3cret@store.example/runs", "api_token": "tok-123",
                           "git_revision": "abc123"})
    data = MlflowClient(uri).get_run(run).data
    assert data.params == {
        "storage.uri": "s3://bucket/runs", "storage.aws_secret_access_key": REDACTED,
        "tracking.uri": "http://***:***@mlflow.example:5000/x", "db.password": REDACTED, "db.port": "5432",
        "db.token": "", "train.lr": "0.001"}  # an empty secret stays empty: nothing to hide
    assert data.tags["storage"] == "https://***:***@store.example/runs"
    assert data.tags["api_token"] == REDACTED and data.tags["git_revision"] == "abc123"
    stored = repr(data.params) + repr(data.tags)
    for secret in ("s3cr3t-key", "pa55word", "hunter2", "t0ps3cret", "tok-123", "alice", "bob"):
        assert secret not in stored
    # and nothing of them in the database file itself
    raw = (tmp_path / "mlflow.db").read_bytes()
    assert not any(s.encode() in raw for s in ("s3cr3t-key", "pa55word", "hunter2", "t0ps3cret", "tok-123"))


def test_bad_config_fails_before_ray_or_mlflow_is_imported(tmp_path):
    code = ("import sys; from pipelines import full; "
            "rc = full.main(['--config', 'configs/smoke.yaml', '--set', 'train.epochz=1', "
            f"'--set', 'storage.uri={tmp_path / 'runs'}']); "
            "print('IMPORTED', sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules)); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "train.epochz: unknown key" in res.stderr
    assert "IMPORTED []" in res.stdout  # the error came from the config alone: no Ray, no tracking store
    assert not (tmp_path / "runs").exists()
