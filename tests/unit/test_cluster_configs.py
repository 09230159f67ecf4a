"""The cluster YAMLs parse and name the fields their tools require; image tags match the pinned Ray."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    hi = re.search(r'"ray\[[^\]]+\]>=[\d.]+,<([\d.]+)"', text).group(1)
    major, minor = hi.split(".")[:2]
    return f"{major}.{int(minor) - 1}"  # <2.61 -> 2.60


def test_launcher_yaml_has_required_fields():
    cfg = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    for node in cfg["available_node_types"].values():
        assert "node_config" in node and "InstanceType" in node["node_config"]
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{_ray_pin()}.")
    assert cfg["docker"]["image"].endswith("-py311-gpu")


def test_rayjob_has_entrypoint_cluster_spec_and_shm():
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cmd = spec["entrypoint"].split()
    assert cmd[:3] == ["xai-ray", "run", "--config"] and (ROOT / "pipelines" / "configs" / f"{cmd[3]}.yaml").is_file()
    assert "working_dir" not in yaml.safe_load(spec["runtimeEnvYAML"])  # the image holds the installed package
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith(_ray_pin())
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and any(m["mountPath"] == "/dev/shm" for c in pod["containers"] for m in c["volumeMounts"])
        names = {e["name"] for c in pod["containers"] for e in c["env"]}
        assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names
        for c in pod["containers"]:  # secrets come from a Secret, never inline
            for e in c["env"]:
                if "SECRET" in e["name"] or "KEY_ID" in e["name"]:
                    assert "valueFrom" in e and "value" not in e


def test_runtime_env_parses():
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]


def test_the_rayjob_image_is_built_by_the_dockerfile():
    """cluster/Dockerfile: FROM the pinned Ray's GPU image, the package installed, the console script there;
    the RayJob runs that image (tag as the Dockerfile's build line names it)."""
    docker = (ROOT / "cluster/Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_pin()}" in docker and "-py311-gpu" in docker
    assert "pip install --no-cache-dir /home/ray/src" in docker and "xai-ray configs" in docker
    tag = re.search(r"docker build -f cluster/Dockerfile -t REGISTRY/(\S+) \.", docker)[1]
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert {c["image"].split("/", 2)[-1] for p in pods for c in p["containers"]} == {tag}
    for path in re.findall(r"^COPY \S+ (.+) /home/ray/src", docker, re.M):
        for name in path.split():
            assert (ROOT / name).exists(), name


def test_the_job_upload_leaves_out_the_committed_runs(tmp_path):
    """`ray job submit --working-dir .` zips the checkout as Ray does (Ray's own packaging, .gitignore read):
    the committed paper run (artifacts/, about 100 MiB, tracked so .gitignore cannot leave it out) took the
    package over the dashboard's 100 MiB cap (CI of 7c0b232: HTTP 413, the e2e job never started). The
    .rayignore keeps it out, and the code the job runs stays in."""
    import zipfile

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    pkg = tmp_path / "working_dir.zip"  # the default excludes (.git, .venv) as working_dir.py passes them
    create_package(str(ROOT), pkg, include_gitignore=True, excludes=ray_constants.get_runtime_env_default_excludes())
    names = zipfile.ZipFile(pkg).namelist()
    assert not [n for n in names if n.startswith(("artifacts/", "runs/", ".venv/", ".git/"))]
    assert {"pipelines/full.py", "xai_core/__init__.py", "configs/smoke.yaml"} <= set(names)
    tracked = sum(p.stat().st_size for p in (ROOT / "artifacts").rglob("*") if p.is_file())
    assert pkg.stat().st_size < 20 * 2**20 < tracked  # the repo without its runs is a few MiB
