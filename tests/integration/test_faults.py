"""Faults: a driver, a training worker and actors killed mid-pipeline, bad inputs, an unreachable MLflow
server, a foreign checkpoint.

Each must end in a clear message and leave committed outputs as they were; a rerun finishes the work, and
a run that lost a process ends with the outputs of the shared smoke run, which lost none. Processes are
killed at named pause points (pipelines.common.pause_point), never after a guessed delay.
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
from tests._services import ROOT, free_port

SMOKE = str(ROOT / "configs/smoke.yaml")


# ------------------------------------------------------------- the same outputs as the uninterrupted run
def _final_weights(store: Path) -> dict:
    """The trained models' weights, by model."""
    import torch

    return {p.parent.name: torch.load(p, weights_only=True)["model"] for p in (store / "train").glob("*/model.pt")}


def _assert_same_weights(store: Path, reference: Path, models: list[str]) -> None:
    import torch

    got, want = _final_weights(store), _final_weights(reference)
    assert sorted(got) == models and set(models) <= set(want)
    for key in models:
        for name, tensor in want[key].items():
            assert torch.equal(got[key][name], tensor), (key, name)


def _table(folder: Path, sort_by: list[str], where: dict | None = None) -> object:
    import pandas as pd
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - tensor extension types

    df = pd.concat([pq.read_table(f).to_pandas() for f in sorted(folder.rglob("*.parquet"))], ignore_index=True)
    for col, allowed in (where or {}).items():
        df = df[df[col].isin(allowed)]
    return df.sort_values(sort_by, kind="stable").reset_index(drop=True)


def _assert_same_table(folder: Path, reference: Path, sort_by: list[str], where: dict | None = None) -> None:
    """Every row and column equal, arrays element for element (NaN where the reference has NaN); of the
    reference, the rows whose columns take the ``where`` values."""
    got, want = _table(folder, sort_by), _table(reference, sort_by, where)
    assert list(got.columns) == list(want.columns) and len(got) == len(want) > 0
    for col in want.columns:
        a, b = got[col].to_numpy(), want[col].to_numpy()
        if a.dtype == object:
            a, b = np.stack(a), np.stack(b)
        np.testing.assert_array_equal(a, b, err_msg=f"{folder.name}: column {col}")


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


def _wait_checkpointed(ray_dir: Path, model: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s  # bounds a hang only
    while not _checkpointed(ray_dir, model):
        assert time.monotonic() < deadline, f"Ray Train registered no checkpoint of {model}"
        time.sleep(0.1)


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


# What the fault runs evaluate: a subset of the smoke run's methods (a CAM method on the loaded model and an
# input-gradient method on the actor's inference copy, both detection methods) and no random-weights baseline.
# No swept method (tif, the thresholded control), so the sweep does not run: it has no process to lose that
# evaluate's actor pool does not have too, and the smoke run and tests/integration/test_pipeline.py cover it.
# Not HAF: the smoke run evaluates it at the steps and lr the sweep calibrated, which a run without the sweep
# cannot know. Every row is computed per (model, method, image), so these rows must equal the smoke run's rows
# of the same models and methods; the report is not run (--until evaluate).
FAULT_METHODS = ["gradcam", "saliency"]
FAULT_MODELS = ["consistency_s0", "erm_s0", "scaat_s0"]


@pytest.mark.slow
def test_killed_worker_actors_and_driver_end_as_the_uninterrupted_run(request, tmp_path):
    """The smoke pipeline in a subprocess of its own Ray. Run 1: the Ray Train worker is SIGKILLed after
    ERM's checkpointed epoch 1 (Ray Train restarts it), a precompute actor inside batch 64 of consistency
    round 1 (it restarts and redoes the batch), and then the driver while SCAAT trains (after its epoch-1
    checkpoint; ERM and consistency are committed). Run 2, the same command: the committed stages and models
    are skipped, SCAAT resumes from its checkpoint, and an evaluate actor is SIGKILLed inside its test batch.
    Weights, precompute rows, evaluate tables and checks end equal to the shared smoke run's, which
    lost nothing; MLflow steps never repeat. The smoke run is asked for only at the comparison: with
    pytest-xdist the fault runs go on while another worker runs it."""
    from mlflow.tracking import MlflowClient

    from tests._pause import Pauses

    runs, db = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = runs / "smoke"
    cmd = [sys.executable, "pipelines/full.py", "--config", "configs/smoke.yaml", "--set", "ray.num_cpus=4",
           "--set", f"storage.uri={runs}", "--set", f"tracking.uri={db}", "--until", "evaluate",
           "--set", f"evaluate.methods=[{','.join(FAULT_METHODS)}]", "--set", "evaluate.random_baseline=false",
           "--set", "evaluate.shard_images=16"]  # the test split in 2 committed shards (the smoke run: 1)
    # Its own local Ray: no RAY_ADDRESS, and a Ray temp dir of its own (short: Unix socket paths), so it
    # neither attaches to the session's Ray nor to /tmp/ray/ray_current_cluster; the unique RAY_TMPDIR
    # also marks every process of that Ray for the clean-up. Same CPUs as the session's Ray: same plan.
    ray_tmp = tempfile.mkdtemp(prefix="rayk", dir="/tmp")
    marker = f"RAY_TMPDIR={ray_tmp}"
    pauses = Pauses(tmp_path / "pauses")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_DATA_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1",
               XAI_PAUSE_DIR=str(pauses.folder))
    log1 = tmp_path / "run1.log"
    for name in ("train-erm-s0-epoch1", "precompute-batch64", "train-scaat-s0-epoch1"):
        pauses.arm(name)  # the precompute batch: the second of round 1's three (192 samples, batch 64)
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        worker = pauses.wait("train-erm-s0-epoch1", alive=alive)
        _wait_checkpointed(store / "ray", "erm_s0")
        os.kill(worker, signal.SIGKILL)
        pauses.release("train-erm-s0-epoch1")
        actor = pauses.wait("precompute-batch64", alive=alive)
        precompute_committed_at_kill = (store / "precompute" / "s0_round1" / "_manifest.json").exists()
        os.kill(actor, signal.SIGKILL)
        pauses.release("precompute-batch64")
        pauses.wait("train-scaat-s0-epoch1", alive=alive)
        _wait_checkpointed(store / "ray", "scaat_s0")
        assert alive(), log1.read_text()[-3000:]
        ingest_before = (store / "ingest" / "_manifest.json").read_text()
    finally:
        _kill_own_ray(proc, marker)
    pauses.clear()
    assert not precompute_committed_at_kill  # the actor died mid-stage
    assert (store / "train" / "erm_s0" / "_manifest.json").exists()
    assert (store / "train" / "consistency_s0" / "_manifest.json").exists()
    assert not (store / "train" / "scaat_s0" / "_manifest.json").exists()
    assert not (store / "train" / "_manifest.json").exists() and not (store / "evaluate").exists()

    pauses.arm("evaluate-test-batch0")  # the test split's one batch (16 images, batch 16)
    log2 = tmp_path / "run2.log"
    with open(log2, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        actor = pauses.wait("evaluate-test-batch0", alive=lambda: proc.poll() is None)
        os.kill(actor, signal.SIGKILL)
        pauses.release("evaluate-test-batch0")  # the restarted actor reruns the batch without pausing
        assert proc.wait(timeout=600) == 0, log2.read_text()[-5000:]
    finally:
        _kill_own_ray(proc, marker)  # leftovers of the rerun's Ray, if any
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = log2.read_text()
    assert "skipped committed ingest" in out and "ran train, evaluate;" in out, out[-3000:]
    assert "train: erm_s0 already committed, skipped" in out and "consistency_s0 already committed" in out
    assert "[scaat s0] resumed from epoch 1" in out  # from the killed run's Ray Train checkpoint
    assert (store / "ingest" / "_manifest.json").read_text() == ingest_before  # not rewritten

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("xai-ray-smoke").experiment_id
    for key in ("erm_s0", "scaat_s0"):  # the restarted worker / the rerun logged into the same run
        (run,) = client.search_runs([exp], filter_string=f"tags.`xai.model` = '{key}'")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2], key
        assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")] == [1.0], key

    ref = request.getfixturevalue("smoke_run")["store"]
    _assert_same_weights(store, ref, ["consistency_s0", "erm_s0", "scaat_s0"])
    for key in FAULT_MODELS:  # the epochs' validation records, resumed ones included, and so the selection
        got_ck, want_ck = (json.loads((s / "train" / key / "_manifest.json").read_text())["checkpoints"]
                           for s in (store, ref))
        assert got_ck == want_ck, key
    rnd = Path("precompute") / "s0_round1"
    assert json.loads((store / rnd / "_manifest.json").read_text())["rows"] == {"samples": 192}
    _assert_same_table(store / rnd / "samples", ref / rnd / "samples", ["idx"])  # every sample once, same bytes
    import pyarrow.parquet as pq

    assert pq.read_table(store / rnd / "weights.parquet").equals(pq.read_table(ref / rnd / "weights.parquet"))
    for split in ("test", "dwsol"):
        _assert_same_table(store / "evaluate" / split, ref / "evaluate" / split, ["model", "method", "idx"],
                           where={"model": FAULT_MODELS, "method": [*FAULT_METHODS, "none"]})
    assert not (store / "report").exists()  # --until evaluate
    got, want = (json.loads((s / "evaluate" / "summary.json").read_text()) for s in (store, ref))
    assert sorted(got) == FAULT_MODELS
    for model in FAULT_MODELS:  # detection, randomisation and attack rates of the methods evaluated here
        assert "detection_auroc_saliency_eps8" in got[model] and "randomisation_gradcam_fc" in got[model], got[model]
        assert got[model] == {k: want[model][k] for k in got[model]}, model
    assert not (store / "sweep").exists()  # nothing swept is evaluated here


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
    assert sum(manifest["rows"][s] for s in ("train", "val", "test")) == 20  # every good image, once
    committed = (tmp_path / "runs" / "smoke" / "ingest" / "_manifest.json").read_bytes()
    files_before = sorted(p.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").rglob("*"))

    args = ["--config", SMOKE, *[a for c in common for a in ("--set", c)], "--set", "data.on_bad_input=fail"]
    assert full.main(args) == 1
    err = capsys.readouterr().err
    assert f"bad input {str(folder / 'dog' / 'broken.png')!r}" in err and "on_bad_input" in err
    assert (tmp_path / "runs" / "smoke" / "ingest" / "_manifest.json").read_bytes() == committed
    assert sorted(p.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").rglob("*")) == files_before


@pytest.mark.timeout(120)  # bounds a hang: MLflow's own client would retry for minutes
def test_unreachable_mlflow_server_fails_fast_naming_it(tmp_path, capsys):
    from pipelines import full

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc = full.main(["--config", SMOKE, "--set", f"tracking.uri={uri}", "--set", f"storage.uri={tmp_path / 'runs'}"])
    assert rc == 1
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


@pytest.fixture(scope="module")
def committed_folder_ingest(ray_session, tmp_path_factory):
    """One committed ingest of a good image folder (with masks), shared by the bad-input cases: each copies
    it, breaks its own copy of the data and checks that its copy of the commit is left alone."""
    from pipelines import full

    base = tmp_path_factory.mktemp("folder-ingest")
    images, masks = _good_folder(base / "data")
    settings = ["data.source=folder", "data.num_classes=2", f"storage.uri={base / 'runs'}",
                f"tracking.uri=sqlite:///{base / 'mlflow.db'}"]
    args = ["--config", SMOKE, "--only", "ingest", *[a for c in (
        *settings, f"data.folder={images}", f"data.mask_dir={masks}") for a in ("--set", c)]]
    assert full.main(args) == 0
    assert (base / "runs" / "smoke" / "ingest" / "_manifest.json").exists()
    return base


@pytest.mark.slow
@pytest.mark.parametrize("breaker", [_break_wrong_mask, _break_extra_class, _break_nan_pixel, _break_empty],
                         ids=["wrong-size-mask", "too-many-classes", "nan-pixel", "empty-dataset"])
def test_bad_input_is_named_before_work_and_leaves_the_commit_alone(committed_folder_ingest, tmp_path, capsys,
                                                                    breaker):
    """A committed ingest; the data then goes bad; a forced re-ingest fails naming what, where and what was
    expected, and every committed file is byte-identical afterwards. (Labels outside the classes, image
    dtypes and mask shapes of the arrays are checked by ingest._validate: tests/unit/test_ingest_validate.py.)"""
    from pipelines import full

    shutil.copytree(committed_folder_ingest, tmp_path, dirs_exist_ok=True)
    images, masks, runs = tmp_path / "data" / "images", tmp_path / "data" / "masks", tmp_path / "runs"
    args = ["--config", SMOKE, "--only", "ingest", "--force", "ingest", *[a for c in (
        "data.source=folder", f"data.folder={images}", f"data.mask_dir={masks}", "data.num_classes=2",
        f"storage.uri={runs}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}") for a in ("--set", c)]]
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert any(p.name == "_manifest.json" for p in before)
    expected = breaker(images, masks)
    capsys.readouterr()
    assert full.main(args) == 1
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
