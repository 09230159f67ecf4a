"""End to end as a user runs it: `ray start --head` on loopback, `ray job submit` of the smoke config,
wait for SUCCEEDED, and stop the cluster this test started (and only it)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._procs import kill_processes_with_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def head(tmp_path):
    port, dash, agent = _free_port(), _free_port(), _free_port()
    key, value = "XAI_E2E_HEAD", f"{os.getpid()}-{port}"  # every process of this cluster inherits it
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180", key: value}
    temp = Path("/tmp") / f"ray_e2e_{os.getpid()}"  # Ray's socket paths must stay short
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}",  # not 52365: another local Ray's agent may hold it
         f"--temp-dir={temp}"],
        env=env, cwd=tmp_path, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # `ray start --block` stops its own cluster on SIGTERM, but took 34 s doing it (suite of fb991fb);
        # the job is over by now and nothing of the cluster is kept: whatever is left after 5 s is killed.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        kill_processes_with_env(f"{key}={value}")


def test_ray_job_submit_smoke(head, tmp_path):
    address, env = head
    client_env = {**env, "RAY_AUTH_MODE": "token"}  # RAY_NOTES: ray start turns token auth on
    runtime = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime), "--", "python", "pipelines/full.py",
           "--config", "configs/smoke.yaml", "--set", f"storage.uri={tmp_path / 'runs'}",
           "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
           # what this test adds is the submission path (job agent, working_dir upload, the driver on the cluster);
           # every stage and method of the smoke config runs in tests/integration: one model, one method here
           "--set", "evaluate.methods=[gradcam, tif]", "--set", "train.modes=[erm]", "--set", "sweep.enabled=false",
           "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0"]
    for _ in range(30):  # the job agent comes up a little after the dashboard answers
        submit = subprocess.run(cmd, env=client_env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr:
            break
        time.sleep(4)
    assert submit.returncode == 0, submit.stderr + submit.stdout
    job_id = next(w.strip("'") for w in submit.stdout.split() if w.strip("'").startswith("raysubmit_"))
    deadline, status = time.time() + 900, ""
    while time.time() < deadline:
        out = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                             env=client_env, capture_output=True, text=True, timeout=60).stdout
        found = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out)
        status = found.group(1).upper() if found else ""
        if status:
            break
        time.sleep(5)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id],
                          env=client_env, capture_output=True, text=True, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "Done in" in logs and (tmp_path / "runs" / "smoke" / "report" / "report.html").exists()
