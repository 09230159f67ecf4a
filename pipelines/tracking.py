"""MLflow: one parent run per pipeline run, nested runs per stage and trial, secrets redacted.

Only the driver and rank 0 of a training run log (one SQLite writer at a time). Runs are found again
by tags, so a rerun of the same config continues the same parent run instead of creating another.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECRET_PATTERN = re.compile(r"(secret|password|passwd|token|credential|access_key|private)", re.I)
REDACTED = "***"


KIND_TAG = "mlflow.experimentKind"


def tracking_uri(configured: str | None) -> str:
    """The config's URI, else mlflow.db in the current directory; a relative sqlite path is made absolute
    (relative to the current directory) here, on the driver: workers run elsewhere."""
    if configured:
        if configured.startswith("sqlite:///") and not configured.startswith("sqlite:////"):
            rel = configured[len("sqlite:///"):]
            return f"sqlite:///{(Path.cwd() / rel).resolve()}"
        return configured
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a nested config with secret-looking keys and URL credentials replaced by ***."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, key) for v in obj]
    if SECRET_PATTERN.search(key) and obj not in (None, ""):
        return REDACTED
    if isinstance(obj, str):
        return re.sub(r"(://)[^/@\s:]+:[^/@\s]+@", r"\1***:***@", obj)
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_server(uri: str, attempts: int = 3, timeout: float = 5.0) -> None:
    """Fail fast (seconds) on a tracking server that does not answer; MLflow's own client retries for
    minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, 120 s timeout), which is right for a flaky server during a
    run but looks like a hang at startup. Any HTTP answer (even 401/404) counts as reachable."""
    import time

    import requests

    last: Exception | None = None
    for i in range(attempts):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            return
        except requests.RequestException as e:
            last = e
            time.sleep(min(2.0 ** i, 4.0) if i + 1 < attempts else 0)
    raise ConnectionError(f"MLflow tracking server {redact(uri)} is unreachable after {attempts} attempts "
                          f"({type(last).__name__}): start it or fix tracking.uri")


class Tracker:
    """Thin wrapper over MlflowClient bound to one tracking URI and experiment."""

    def __init__(self, uri: str, experiment: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # Artifacts beside a SQLite store (absolute): MLflow's default ./mlruns is relative to the
            # process's cwd, which differs for a Ray job's driver and for workers.
            location = None
            if uri.startswith("sqlite:///"):
                location = Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlruns").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or KIND_TAG not in exp.tags:
            # MLflow 3's UI opens an experiment without this tag on its GenAI (traces) overview
            self.client.set_experiment_tag(self.experiment_id, KIND_TAG, "custom_model_development")

    @functools.cached_property
    def source_tags(self) -> dict[str, str]:
        """Tags of every run this tracker creates: entry point and git revision (computed on first use: the
        trackers of training workers only log metrics and never pay for ``git``)."""
        entry = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "xai_ray"
        return {"mlflow.source.name": entry, "mlflow.source.type": "JOB", "mlflow.source.git.commit": git_revision()}

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, rows: int, context: str) -> None:
        """Record a dataset as an MLflow input of a run (the UI's Dataset column): its name, digest (the
        ingest key), where its Parquet files are and its row count; ``context`` e.g. "training"."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="s3" if source.startswith("s3://") else "local",
                     source=json.dumps({"uri": source}), profile=json.dumps({"num_rows": rows}))
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    def find_or_create(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """A run with these tags (and parent) that already exists, else a new one; returns its id."""
        tags = {k: str(v).replace("'", "").replace('"', "") for k, v in tags.items()}  # filter-safe values
        filt = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()] +
                            ([f"tags.`mlflow.parentRunId` = '{parent_id}'"] if parent_id else []))
        found = self.client.search_runs([self.experiment_id], filter_string=filt, max_results=1,
                                        order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {**self.source_tags, **tags}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in flatten(redact(params)).items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self._log_points(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_series(self, run_id: str, series: dict[str, list[float]]) -> None:
        """Curves: each key's values at steps 0, 1, ... (batched writes, as log_metrics)."""
        self._log_points(run_id, [(k, v, step) for k, vs in series.items() for step, v in enumerate(vs)])

    def _log_points(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v, step in points if v == v]  # drop NaN
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for a metric of a run (0 when none): lets a resumed writer skip steps."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in redact(tags).items():
            self.client.set_tag(run_id, k, str(v))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """Make run_id the fluent API's active run (for mlflow.pytorch.log_model, log_figure)."""
        import mlflow

        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield
        self.client.update_run(run_id, status="RUNNING")  # the stage closes it, not the context

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)


def worker_env(uri: str) -> dict[str, str]:
    """Environment a Ray worker needs to reach the same tracking store and artifact endpoint."""
    env = {"MLFLOW_TRACKING_URI": uri}
    for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env
