"""The ingest stage on a generated image folder: images/s with a 1-CPU and a 2-CPU local Ray, and the driver's
peak memory, against the size of the decoded dataset (what the former ingest held in one array).

    python -m bench.ingest                     # 20,000 JPEGs of 160x120 in 4 classes, data.size 64
    python -m bench.ingest --images 2000 --tiny

Each measurement is a fresh process (``--one N``): it starts a local Ray with N CPUs, runs ``ingest.run``
twice (listing with every image checked on the driver, then decode + resize + Parquet in Ray Data tasks):
cold, as a pipeline's first stage (Ray's workers start and import torch), then warm; it reports both wall
times and the driver's peak resident memory (``ru_maxrss``; the Ray worker processes are
not the driver). The two CPU counts alternate over ``--repeats`` rounds on the same folder; medians. Rows
are checked: every image once, in every split. Writes bench/results/ingest.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._timing import machine, markdown_table, publish

CLASSES = 4


def make_folder(root: Path, n: int, w: int = 160, h: int = 120) -> Path:
    """n JPEGs of w x h in CLASSES class folders (smooth random colours: decodes like a photo, compresses)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR)
        im.save(root / f"class{i % CLASSES}" / f"{i:06d}.jpg", quality=90)
    return root


def one(folder: str, cpus: int, size: int, out: str) -> dict:
    import ray

    from pipelines import ingest
    from pipelines import storage as st
    from pipelines.config import load_config

    cfg = load_config("smoke", ["data.source=folder", f"data.folder={folder}", f"data.num_classes={CLASSES}",
                                f"data.size={size}", "data.rows_per_shard=2048", f"storage.uri={out}"])
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    seconds = []
    for _ in range(2):  # cold (Ray's workers start and import torch), then warm (they are up)
        t0 = time.perf_counter()
        manifest, did = ingest.run(cfg, st.from_config(cfg), force=True)
        seconds.append(time.perf_counter() - t0)
        assert did
    ray.shutdown()
    return {"seconds": seconds[0], "warm_seconds": seconds[1], "rows": sum(manifest["rows"].values()),
            "peak_driver_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="200 images, for the bench tests")
    p.add_argument("--out-dir", dest="out", default=None)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one measurement with this many CPUs
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(one(a.folder, a.one, a.size, out)))
        return {}
    n = 200 if a.tiny else a.images
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "images", n)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(a.repeats):
            for cpus in (1, 2):
                res = subprocess.run([sys.executable, "-m", "bench.ingest", "--one", str(cpus), "--folder", str(folder),
                                      "--size", str(a.size)], capture_output=True, text=True, check=True,
                                     env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
                got = json.loads(res.stdout.strip().splitlines()[-1])
                assert got["rows"] == n, got
                runs[cpus].append(got)
    decoded_mib = n * (3 * a.size * a.size + a.size * a.size) / 2**20  # uint8 image + bool mask per row
    rows = []
    for cpus, rs in runs.items():
        s = statistics.median(r["seconds"] for r in rs)
        w = statistics.median(r["warm_seconds"] for r in rs)
        rows.append({"cpus": cpus, "images": n, "seconds": round(s, 2), "images_per_s": round(n / s, 1),
                     "warm_seconds": round(w, 2), "warm_images_per_s": round(n / w, 1),
                     "peak_driver_mib": round(max(r["peak_driver_mib"] for r in rs), 1)})
    payload = {"machine": machine(), "images": n, "size": a.size, "decoded_mib": round(decoded_mib, 1),
               "repeats": a.repeats, "rows": rows}
    table = markdown_table(["Ray CPUs", "images", "s (cold)", "images/s (cold)", "s (warm)", "images/s (warm)",
                            "driver peak RSS (MiB)"],
                           [[str(r[k]) for k in ("cpus", "images", "seconds", "images_per_s", "warm_seconds",
                                                 "warm_images_per_s", "peak_driver_mib")]
                            for r in rows])
    return publish(payload, "ingest", a.out, table + f"\n\ndecoded dataset: {decoded_mib:.1f} MiB")


if __name__ == "__main__":
    main()
