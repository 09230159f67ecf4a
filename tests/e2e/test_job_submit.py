"""End to end as a user deploys it, on a two-node cluster: `ray start --head` and `ray start --address` (a
second node) on loopback, `ray job submit` of the smoke config with SCAAT trained by two DDP workers spread
over the two nodes (gloo; SCAAT's gradients averaged by train.sync_grads), the store in S3 (a moto server)
and MLflow behind `mlflow server`; wait for SUCCEEDED, read the results back from the bucket and the
server, rerun, and stop the cluster this test started (and only it)."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._procs import kill_processes_with_env
from tests._services import ROOT, S3_TEST_ENV, bucket_keys, free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as e:  # 401 (auth on) also proves the server answers
            if getattr(e, "code", None):
                return
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args], env=env,
                            cwd=log.parent, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    # `ray start --block` stops its own node on SIGTERM, but took 34 s doing it (suite of fb991fb); the job
    # is over by now and nothing of the cluster is kept: whatever is left after 5 s is killed.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker node of 2 CPUs each; yields (dashboard address, client environment)."""
    port, dash = free_port(), free_port()
    key, value = "XAI_E2E_HEAD", f"{os.getpid()}-{port}"  # every process of this cluster inherits it
    # RAY_NOTES: `ray start` turns token authentication on. The cluster's token is given to both nodes and the
    # client here: left to `ray start`, it lands in ~/.ray/auth_token, and on a fresh machine (a clean CI
    # run of 70bc62a) the first `ray job submit` found none there ("Ray couldn't find an authentication token").
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), key: value}
    temp = Path("/tmp") / f"ray_e2e_{os.getpid()}"  # Ray's socket paths must stay short
    nodes = [_ray_start(
        ["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp}",
         f"--dashboard-agent-listen-port={free_port()}"],  # not 52365: another local Ray's agent may hold it
        env, tmp_path / "head.log")]
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        # A temp dir of its own: sharing the head's, its runtime-env agent deleted the job's working_dir
        # package under the running driver (os.getcwd() failed in the driver: FileNotFoundError).
        nodes.append(_ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--temp-dir={temp}_2",
                                 f"--dashboard-agent-listen-port={free_port()}"], env, tmp_path / "node2.log"))
        yield f"http://127.0.0.1:{dash}", env
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        kill_processes_with_env(f"{key}={value}")


def _dashboard_json(address: str, token: str, path: str) -> dict:
    """GET a dashboard REST path (what `ray job status` / `ray list` ask) from this process, with the
    cluster's token; {} while the dashboard is busy or still starting. Polling with the CLI started a Python
    process that imports Ray (about 1.5 s of CPU) every 2 s beside the job, on 2 cores."""
    import urllib.request

    req = urllib.request.Request(f"{address}{path}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _alive_nodes(address: str, token: str) -> int:
    """How many nodes the state API lists as ALIVE (0 while it answers with a message instead)."""
    out = _dashboard_json(address, token, "/api/v0/nodes?limit=100")
    rows = ((out.get("data") or {}).get("result") or {}).get("result") or []
    return sum(1 for n in rows if isinstance(n, dict) and n.get("state") == "ALIVE")


def test_ray_job_submit_to_two_nodes_with_s3_and_mlflow_server_then_rerun_as_no_op(
        cluster, moto_s3, mlflow_server_s3, ray_session, tmp_path, capsys):
    """The deployment a user runs: the job on the cluster, stage outputs and Ray Train checkpoints in the
    bucket, MLflow through `mlflow server` whose artifact store (figures, report, logged model) is the same
    S3 endpoint; SCAAT by two DDP workers, one per node. Then the same command again (here, in-process):
    every stage is committed in the bucket, nothing runs."""
    from mlflow.tracking import MlflowClient

    from pipelines import full

    address, env = cluster
    bucket, client = moto_s3["bucket"], moto_s3["client"]
    # the job's processes sign S3 requests with the credentials its runtime environment gives them
    runtime = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "XAI_DEBUG": "1", **S3_TEST_ENV}}
    args = ["--config", "configs/smoke.yaml", "--set", f"storage.uri=s3://{bucket}/runs",
            "--set", f"storage.s3_endpoint={moto_s3['endpoint']}", "--set", f"tracking.uri={mlflow_server_s3}",
            # what this test adds is the deployment path (job agent, working_dir upload, the driver on the
            # cluster, DDP over two nodes, S3, the MLflow server); every stage and method of the smoke config
            # runs in tests/integration
            "--set", "train.modes=[scaat]", "--set", "train.num_workers=2", "--set", "train.placement=SPREAD",
            "--set", "evaluate.methods=[gradcam]", "--set", "sweep.enabled=false", "--set", "sweep.model=scaat",
            "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0",
            "--set", "evaluate.random_baseline=false", "--set", "evaluate.n_accuracy=16",
            # the path of splits too large for one process: Ray Data writes and reads the Parquet files and
            # streams the training split into the two workers' shards (streaming_split); the integration
            # tests read small splits in the driver and the training workers (ingest.fit_input)
            "--set", "storage.driver_io_mb=0"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime), "--", "python", "pipelines/full.py", *args]
    deadline = time.time() + 300  # bounds a hang only (a loaded box took > 120 s for the second node once)
    token = env["RAY_AUTH_TOKEN"]
    while _alive_nodes(address, token) != 2:  # both nodes registered: the job must be able to spread its workers
        assert time.time() < deadline, (tmp_path / "node2.log").read_text()[-2000:]
        time.sleep(2)
    for _ in range(30):  # the job agent comes up a little after the dashboard answers
        submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr:
            break
        time.sleep(4)
    assert submit.returncode == 0, submit.stderr + submit.stdout
    job_id = next(w.strip("'") for w in submit.stdout.split() if w.strip("'").startswith("raysubmit_"))
    deadline, status = time.time() + 900, ""  # bounds a hang only
    while time.time() < deadline:
        status = str(_dashboard_json(address, token, f"/api/jobs/{job_id}").get("status", ""))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "Done in" in logs and f"Outputs: s3://{bucket}/runs/smoke" in logs

    keys = bucket_keys(client, bucket, "runs/smoke/")
    for stage in ("ingest", "train", "train/scaat_s0", "evaluate", "report"):
        assert f"{stage}/_manifest.json" in keys, sorted(keys)
    for split in ("train", "val", "test", "dwsol"):
        assert any(k.startswith(f"ingest/{split}/") and k.endswith(".parquet") for k in keys), split
    assert any(k.startswith("evaluate/test/") and k.endswith(".parquet") for k in keys)
    assert "train/scaat_s0/model.pt" in keys and "report/report.html" in keys
    assert any(k.startswith("ray/") and k.endswith("/state.pt") for k in keys), "Ray Train checkpoints on S3"
    assert not any(k.startswith(("sweep/", "precompute/")) for k in keys)
    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/smoke/evaluate/_manifest.json")["Body"].read())
    assert manifest["models"] == ["scaat_s0"]
    assert manifest["rows"] == {"test": 16 * 2, "dwsol": 8}  # n_test x (gradcam + none); n_dwsol x gradcam
    assert len(client.get_object(Bucket=bucket, Key="runs/smoke/report/report.html")["Body"].read()) > 5_000

    artifacts = bucket_keys(client, bucket, "mlflow-artifacts/")
    assert any(k.endswith("/report.html") for k in artifacts), sorted(artifacts)[:20]
    assert any(k.endswith(".png") for k in artifacts), "report figures in the S3 artifact store"
    assert any("/model" in k or "models/" in k for k in artifacts), "the logged model in the S3 artifact store"
    ml = MlflowClient(mlflow_server_s3)
    exp = ml.get_experiment_by_name("xai-ray-smoke")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    (run,) = ml.search_runs([exp.experiment_id], filter_string="tags.`xai.model` = 'scaat_s0'")
    nodes = run.data.tags["worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1]  # SPREAD: one worker per node
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert all(m.value > 0 for m in ml.get_metric_history(run.info.run_id, "kl"))  # SCAAT's own term ran

    capsys.readouterr()
    assert full.main(["--config", str(ROOT / "configs/smoke.yaml"), *args[2:]]) == 0
    assert "Nothing to do" in capsys.readouterr().out
    again = json.loads(client.get_object(Bucket=bucket, Key="runs/smoke/evaluate/_manifest.json")["Body"].read())
    assert again == manifest
