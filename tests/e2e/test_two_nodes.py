"""The multi-node path, tested: a two-node local Ray cluster; the two training workers land on different
nodes (SPREAD placement), train with DDP over gloo, and the run finishes with shared storage."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "180"
    sys.path.insert(0, {root!r})
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    from pipelines import full
    rc = full.main(["--config", "configs/smoke.yaml", "--set", "storage.uri={runs}",
                    "--set", "tracking.uri=sqlite:///{db}", "--set", "train.modes=[erm]",
                    "--set", "train.num_workers=2", "--set", "train.placement=SPREAD",
                    "--set", "sweep.enabled=false", "--set", "evaluate.methods=[gradcam]",
                    "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0"])
    ray.shutdown()
    cluster.shutdown()
    sys.exit(rc)
""")


def test_training_workers_spread_over_two_nodes(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    script = SCRIPT.format(root=str(ROOT), runs=str(tmp_path / "runs"), db=str(db))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("xai-ray-smoke")
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "train/erm_s0")
    nodes = run.data.tags["worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1]  # SPREAD: one worker per node
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert (tmp_path / "runs" / "smoke" / "report" / "report.html").exists()
