"""Faults: a driver killed mid-pipeline, bad inputs, an unreachable MLflow server, a foreign checkpoint.

Each must end in a clear message and leave committed outputs as they were; a rerun finishes the work.
(An unknown config key is covered in tests/unit/test_config.py.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import ROOT, free_port

SMOKE = str(ROOT / "configs/smoke.yaml")
REDUCED = ["--set", "train.modes=[erm]", "--set", "sweep.enabled=false", "--set", "evaluate.methods=[gradcam]",
           "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0"]


# ------------------------------------------------------------------------------ driver killed mid-run
def _processes_with_env(marker: str) -> list[int]:
    """PIDs whose environment holds marker (every process of a Ray started under that environment)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _kill_own_ray(proc: subprocess.Popen | None, marker: str) -> None:
    """SIGKILL the subprocess's group and whatever of its own Ray outlived it (never `ray stop`: that
    would stop every Ray on the machine, the test session's included)."""
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    deadline = time.time() + 30
    while (pids := _processes_with_env(marker)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not _processes_with_env(marker), "processes of the killed run's Ray are still alive"


@pytest.mark.slow
def test_driver_killed_during_training_then_rerun_skips_ingest_and_finishes(tmp_path):
    runs = tmp_path / "runs"
    store = runs / "smoke"
    cmd = [sys.executable, "pipelines/full.py", "--config", "configs/smoke.yaml", *REDUCED,
           "--set", f"storage.uri={runs}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
           "--set", "ray.num_cpus=4"]
    # Its own local Ray: no RAY_ADDRESS, and a Ray temp dir of its own (short: Unix socket paths), so it
    # neither attaches to the session's Ray nor to /tmp/ray/ray_current_cluster; the unique RAY_TMPDIR
    # also marks every process of that Ray for the clean-up.
    ray_tmp = tempfile.mkdtemp(prefix="rayk", dir="/tmp")
    marker = f"RAY_TMPDIR={ray_tmp}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_DATA_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list(store.glob("ray/*/checkpoint_*/state.pt")):
                break  # mid-training: epoch 1 of 2 reported its checkpoint
            time.sleep(0.5)
        assert proc.poll() is None, f"the first run ended early:\n{log1.read_text()[-3000:]}"
        assert list(store.glob("ray/*/checkpoint_*")), f"no checkpoint in 240 s:\n{log1.read_text()[-3000:]}"
        ingest_before = (store / "ingest" / "_manifest.json").read_text()
    finally:
        _kill_own_ray(proc, marker)
    assert not (store / "train" / "_manifest.json").exists()
    assert not (store / "evaluate").exists()

    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    (tmp_path / "run2.log").write_text(res.stdout + res.stderr)
    try:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        assert "skipped committed ingest" in res.stdout, res.stdout
        assert "ran train, evaluate, report" in res.stdout
        assert (store / "ingest" / "_manifest.json").read_text() == ingest_before  # not rewritten
        manifest = json.loads((store / "evaluate" / "_manifest.json").read_text())
        assert manifest["rows"] == {"test": 16 * 2, "dwsol": 8}  # n_test x (gradcam + none); n_dwsol x gradcam
        assert manifest["models"] == ["erm_s0"]
        assert (store / "report" / "report.html").exists()
    finally:
        _kill_own_ray(None, marker)  # leftovers of the rerun's Ray, if any
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- bad inputs
def _image_folder(root: Path, per_class: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    return root


@pytest.mark.slow
def test_corrupt_image_skip_records_it_and_fail_names_it_without_touching_the_commit(ray_session, tmp_path,
                                                                                        capsys):
    from pipelines import full, ingest
    from pipelines import storage as st
    from pipelines.config import load_config

    folder = _image_folder(tmp_path / "images")
    common = ["data.source=folder", f"data.folder={folder}", f"storage.uri={tmp_path / 'runs'}",
              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    cfg = load_config(SMOKE, [*common, "data.on_bad_input=skip"])
    store = st.from_config(cfg)
    manifest, did = ingest.run(cfg, store)
    assert did and [s["path"] for s in manifest["skipped"]] == ["dog/broken.png"]
    assert "unreadable image" in manifest["skipped"][0]["reason"]
    assert sum(manifest["rows"][s] for s in ("train", "test")) == 20  # every good image, once
    committed = (tmp_path / "runs" / "smoke" / "ingest" / "_manifest.json").read_bytes()
    files_before = sorted(p.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").rglob("*"))

    args = ["--config", SMOKE, *[a for c in common for a in ("--set", c)], "--set", "data.on_bad_input=fail"]
    assert full.main(args) == 1
    err = capsys.readouterr().err
    assert f"bad input {str(folder / 'dog' / 'broken.png')!r}" in err and "on_bad_input" in err
    assert (tmp_path / "runs" / "smoke" / "ingest" / "_manifest.json").read_bytes() == committed
    assert sorted(p.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").rglob("*")) == files_before


def test_unreachable_mlflow_server_fails_fast_naming_it(tmp_path, capsys):
    from pipelines import full

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    rc = full.main(["--config", SMOKE, "--set", f"tracking.uri={uri}", "--set", f"storage.uri={tmp_path / 'runs'}"])
    assert rc == 1
    assert time.time() - t0 < 30  # MLflow's own client retries for minutes
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} is unreachable" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("_manifest.json"))


def test_tracking_uri_credentials_are_not_printed(tmp_path, capsys):
    from pipelines import full

    uri = f"http://user:s3cr3t@127.0.0.1:{free_port()}"
    assert full.main(["--config", SMOKE, "--set", f"tracking.uri={uri}",
                      "--set", f"storage.uri={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert "s3cr3t" not in err and "127.0.0.1" in err


def test_checkpoint_of_another_architecture_names_source_and_arch():
    from pipelines.common import load_model, state_bytes
    from pipelines.config import load_config
    from xai_core.models import build_model

    cfg = load_config(SMOKE)
    foreign = build_model("resnet18", cfg.data.num_classes)
    data = state_bytes({"model": foreign.state_dict(), "epoch": 2})
    with pytest.raises(ValueError, match=r"runs/other/train/erm_s0/model\.pt does not fit "
                                         r"model\.arch='small_resnet'.*(missing|unexpected) keys"):
        load_model(cfg, data, "runs/other/train/erm_s0/model.pt")
    with pytest.raises(ValueError, match=r"cannot load runs/x/model\.pt"):
        load_model(cfg, b"not a checkpoint", "runs/x/model.pt")
