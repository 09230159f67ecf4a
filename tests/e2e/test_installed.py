"""The package as installed (`pip install .`, not editable) and run from an empty folder: the `xai-ray`
console script finds the shipped configs by name and writes runs/ and mlflow.db where it runs."""

import os
import shutil
import subprocess
import sys

import pytest

from tests._services import ROOT

pytestmark = pytest.mark.slow


def test_installed_package_runs_from_an_empty_folder(tmp_path):
    site, src = tmp_path / "site", tmp_path / "src"  # built from a copy: setuptools writes build/ where it builds
    before = sorted(p.name for p in ROOT.iterdir())
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "artifacts", "mlflow.db",
                                                              "mlruns", "__pycache__", "*.egg-info", "build"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(src)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}  # the installed copy first
    where = subprocess.run([sys.executable, "-c", "import pipelines, xai_core; print(pipelines.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where
    listed = subprocess.run([str(site / "bin" / "xai-ray"), "configs"], cwd=work, env=env, capture_output=True,
                            text=True, check=True).stdout
    assert {line.split()[0] for line in listed.splitlines()} >= {"smoke", "quick", "paper", "cub", "waterbirds", "voc"}
    run = subprocess.run([str(site / "bin" / "xai-ray"), "run", "--config", "smoke", "--until", "ingest"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "runs" / "smoke" / "ingest" / "_manifest.json").is_file() and (work / "mlflow.db").is_file()
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing written into the checkout
    bad = subprocess.run([str(site / "bin" / "xai-ray"), "run", "--config", "smok"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "config file 'smok' does not exist; shipped configs (by name" in bad.stderr
