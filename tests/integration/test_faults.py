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

from tests._procs import kill_processes_with_env
from tests.integration.conftest import ROOT, free_port

SMOKE = str(ROOT / "configs/smoke.yaml")
REDUCED = ["--set", "train.modes=[erm]", "--set", "sweep.enabled=false", "--set", "evaluate.methods=[gradcam]",
           "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0"]


# ------------------------------------------------------------------------------ driver killed mid-run
def _kill_own_ray(proc: subprocess.Popen | None, marker: str) -> None:
    """SIGKILL the subprocess's group and whatever of its own Ray outlived it (never `ray stop`: that
    would stop every Ray on the machine, the test session's included)."""
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    kill_processes_with_env(marker)


def _final_weights(store: Path) -> dict:
    """The trained models' weights, by model."""
    import torch

    return {p.parent.name: torch.load(p, weights_only=True)["model"] for p in (store / "train").glob("*/model.pt")}


@pytest.mark.slow
def test_driver_killed_during_training_then_rerun_skips_ingest_and_finishes(tmp_path):
    runs = tmp_path / "runs"
    store = runs / "smoke"
    settings = ["--config", "configs/smoke.yaml", *REDUCED, "--set", "ray.num_cpus=4", "--set", "train.epochs=3",
                "--set", "data.n_train=768"]
    cmd = [sys.executable, "pipelines/full.py", *settings,
           "--set", f"storage.uri={runs}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
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
            if _checkpointed(store / "ray", "erm_s0"):
                break  # mid-training: Ray Train registered the checkpoint of epoch 1 of 3
            time.sleep(0.3)
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
        assert "[erm s0] resumed from epoch" in res.stdout  # from the killed run's Ray Train checkpoint
        assert (store / "ingest" / "_manifest.json").read_text() == ingest_before  # not rewritten
        manifest = json.loads((store / "evaluate" / "_manifest.json").read_text())
        assert manifest["rows"] == {"test": 16 * 2, "dwsol": 8}  # n_test x (gradcam + none); n_dwsol x gradcam
        assert manifest["models"] == ["erm_s0"]
        assert (store / "report" / "report.html").exists()
    finally:
        _kill_own_ray(None, marker)  # leftovers of the rerun's Ray, if any

    # The same final weights as a run that was never killed (a resumed epoch sees the same batches,
    # ShardCache); the evaluate tables are a function of the weights (evaluate ran whole in the rerun).
    # The reference trains on a copy of the committed ingest (the same bytes) and stops after train.
    ref_runs = tmp_path / "reference"
    shutil.copytree(store / "ingest", ref_runs / "smoke" / "ingest")
    ref = subprocess.run([sys.executable, "pipelines/full.py", *settings, "--set", f"storage.uri={ref_runs}",
                          "--set", f"tracking.uri=sqlite:///{tmp_path / 'reference.db'}", "--only", "train"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    try:
        assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-5000:]
    finally:
        _kill_own_ray(None, marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    import torch

    assert ": ran train." in ref.stdout, ref.stdout  # on the copied ingest
    w_resumed, w_ref = _final_weights(store), _final_weights(ref_runs / "smoke")
    assert sorted(w_resumed) == sorted(w_ref) == ["erm_s0"]
    for name, tensor in w_ref["erm_s0"].items():
        assert torch.equal(w_resumed["erm_s0"][name], tensor), name


# ---------------------------------------------------------- a train worker and a Ray Data actor killed
def _alive_actor_pids(fragment: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this session's Ray (another may run on the machine)
    return [a.pid for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=1000)
            if fragment in a.class_name and a.pid]


def _checkpointed(ray_dir: Path, model: str) -> bool:
    """Ray Train registered at least one checkpoint of this model's run (its manager snapshot lists it):
    only then does a restarted worker group, or a rerun, resume instead of starting over."""
    for snap in ray_dir.glob(f"*{model}*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            continue
    return False


def _logged_epochs(db: str, model: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("xai-ray-smoke")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`xai.model` = '{model}'") if exp else []
    return len(client.get_metric_history(found[0].info.run_id, "loss")) if found else 0


@pytest.mark.slow
def test_train_worker_and_precompute_actor_killed_mid_run_recover(ray_session, tmp_path):
    """SIGKILL the Ray Train worker during ERM epoch 2 and a precompute actor during consistency round 1:
    training resumes from the epoch-1 checkpoint in the same MLflow run (steps never go backwards) and the
    precompute stage commits every training sample exactly once."""
    import threading

    from mlflow.tracking import MlflowClient

    from pipelines import full

    runs, db = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    n_train = 1536
    args = ["--config", SMOKE, *[a for c in (
        "train.modes=[erm,consistency]", f"data.n_train={n_train}", "data.rows_per_shard=256", "train.epochs=3",
        "consistency.rounds=2", "consistency.round_epochs=1", "consistency.steps=6", "precompute.actors=2",
        "precompute.batch_size=32", f"storage.uri={runs}", f"tracking.uri={db}") for a in ("--set", c)]]
    assert full.main(args + ["--only", "ingest"]) == 0
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(rc=full.main(args + ["--only", "train"])), daemon=True)
    runner.start()
    killed: dict[str, int] = {}
    actor_seen_at, committed_at_kill = None, None
    deadline = time.time() + 600
    while runner.is_alive() and time.time() < deadline and len(killed) < 2:
        if "worker" not in killed and _checkpointed(runs / "smoke" / "ray", "erm_s0") \
                and _logged_epochs(db, "erm_s0") >= 1:  # epoch 1 checkpointed, registered and logged
            if pids := _alive_actor_pids("RayTrainWorker"):
                os.kill(pids[0], signal.SIGKILL)
                killed["worker"] = pids[0]
        if "worker" in killed and "actor" not in killed and (pids := _alive_actor_pids("ConsistencyActor")):
            actor_seen_at = actor_seen_at or time.time()
            if time.time() - actor_seen_at > 1:  # the actors loaded the checkpoint and are mapping batches
                os.kill(pids[0], signal.SIGKILL)
                killed["actor"] = pids[0]
                committed_at_kill = (runs / "smoke" / "precompute" / "s0_round1" / "_manifest.json").exists()
        time.sleep(0.2)
    runner.join(timeout=max(1.0, deadline - time.time()))
    assert set(killed) == {"worker", "actor"}, killed
    assert not committed_at_kill  # the actor died mid-stage
    assert result.get("rc") == 0, result

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("xai-ray-smoke").experiment_id
    erm_runs = client.search_runs([exp], filter_string="tags.`xai.model` = 'erm_s0'")
    assert len(erm_runs) == 1  # the restarted worker logged into the same run
    run_id = erm_runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    (resumed,) = [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    assert resumed in (1.0, 2.0)  # from the last checkpoint, not from scratch

    stage = runs / "smoke" / "precompute" / "s0_round1"
    manifest = json.loads((stage / "_manifest.json").read_text())
    assert manifest["rows"] == {"samples": n_train}
    import pyarrow.parquet as pq

    idx = np.concatenate([pq.read_table(runs / "smoke" / f, columns=["idx"])["idx"].to_numpy()
                          for f in manifest["files"]["samples"]])
    assert np.array_equal(np.sort(idx), np.arange(n_train))  # every sample exactly once


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


def _good_folder(root: Path, classes=("cat", "dog"), per_class: int = 8, masks: bool = True) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in classes:
        (root / "images" / cls).mkdir(parents=True)
        (root / "masks" / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "images" / cls / f"{i}.png")
            if masks:
                m = np.zeros((40, 40), np.uint8)
                m[10:30, 10:30] = 255
                Image.fromarray(m).save(root / "masks" / cls / f"{i}.png")
    return root / "images", root / "masks"


def _break_wrong_mask(images: Path, masks: Path) -> str:
    from PIL import Image

    Image.fromarray(np.zeros((20, 24), np.uint8)).save(masks / "dog" / "3.png")
    return (f"mask {str(masks / 'dog' / '3.png')!r} has size (24, 20) (W,H) but image "
            f"{str(images / 'dog' / '3.png')!r} has size (40, 40)")


def _break_extra_class(images: Path, masks: Path) -> str:
    shutil.copytree(images / "dog", images / "emu")
    return "has 3 classes ['cat', 'dog', 'emu'] but data.num_classes=2"


def _break_nan_pixel(images: Path, masks: Path) -> str:
    from PIL import Image

    a = np.full((40, 40), 0.5, np.float32)
    a[3, 4] = np.nan
    Image.fromarray(a).save(images / "cat" / "nan.tif")
    return (f"bad input {str(images / 'cat' / 'nan.tif')!r}: non-finite pixel value nan at row 3, column 4 "
            f"(expected finite values)")


def _break_empty(images: Path, masks: Path) -> str:
    for f in images.rglob("*.png"):
        f.unlink()
    return f"class folders without images (.png, .jpg, .jpeg, .tif, .tiff) in root {str(images)!r}: cat, dog"


@pytest.mark.slow
@pytest.mark.parametrize("breaker", [_break_wrong_mask, _break_extra_class, _break_nan_pixel, _break_empty],
                         ids=["wrong-size-mask", "label-outside-classes", "nan-pixel", "empty-dataset"])
def test_bad_input_is_named_before_work_and_leaves_the_commit_alone(ray_session, tmp_path, capsys, breaker):
    """A committed ingest; the data then goes bad; a forced re-ingest fails naming what, where and what was
    expected, and every committed file is byte-identical afterwards."""
    from pipelines import full

    images, masks = _good_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    args = ["--config", SMOKE, "--only", "ingest", *[a for c in (
        "data.source=folder", f"data.folder={images}", f"data.mask_dir={masks}", "data.num_classes=2",
        f"storage.uri={runs}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}") for a in ("--set", c)]]
    assert full.main(args) == 0
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert any(p.name == "_manifest.json" for p in before)
    expected = breaker(images, masks)
    capsys.readouterr()
    assert full.main(args + ["--force", "ingest"]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


def test_nan_pixel_image_is_skipped_and_recorded_with_skip(tmp_path):
    from xai_core.data.folders import ImageFolderWithMasks

    images, masks = _good_folder(tmp_path / "data", per_class=2)
    _break_nan_pixel(images, masks)
    ds = ImageFolderWithMasks(images, mask_dir=masks, on_bad_input="skip")
    assert len(ds) == 4 and [p for p, _ in ds.skipped] == ["cat/nan.tif"]
    assert "non-finite pixel value nan at row 3, column 4" in ds.skipped[0][1]
