"""A stage's input read: ``ingest.read_split`` by the driver (pyarrow, in-memory blocks) against streamed
through Ray Data's Parquet reader, same files, side by side in one Ray instance.

    python -m bench.reads                  # smoke (192 images, 32 px) and quick (4000 images, 64 px) splits
    python -m bench.reads --repeats 5

Each timed call builds the dataset with ``read_split`` and materialises it (every block in the object
store), i.e. what a stage pays before its first batch: for the streamed read, the listing task, the
footer-reader actor(s) and the read task (Python processes to start); for the driver read, pyarrow in this
process and one ``ray.put`` per file. The storage limit (``storage.driver_io_mb``) is set per side
(0: always stream; the split's size + 1 MiB: read by the driver). Rows, their order and every column's bytes
are checked equal between the two sides. Calls alternate (``bench._timing.measure``), one untimed warm-up
round; medians. Writes bench/results/reads.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from typing import Any

import numpy as np

from bench._timing import machine, markdown_table, measure, publish
from bench.stages import bench_config, prepare_store
from pipelines import ingest
from pipelines.config import ROOT
from pipelines.storage import Storage

SPLITS = {"smoke": ("configs/smoke.yaml", 192, 32), "quick": ("configs/quick.yaml", 4000, 64)}


def _digest(ds: Any) -> str:
    """sha256 over every column (all rows, in the dataset's order; block boundaries do not count)."""
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    h = hashlib.sha256()
    for key in sorted(batches[0]):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.concatenate([b[key] for b in batches])).tobytes())
    return h.hexdigest()


def run_split(name: str, repeats: int, root: str) -> dict:
    config, n, size = SPLITS[name]
    cfg = bench_config(str(ROOT / config), n, size, None)
    store, manifest = prepare_store(cfg, root)
    files = [store.path(f) for f in manifest["files"]["train"]]
    mib = sum(os.path.getsize(f) for f in files) / 2**20
    sides = {"driver": Storage(root, driver_io_mb=mib + 1.0), "streamed": Storage(root, driver_io_mb=0.0)}
    digests = {k: _digest(ingest.read_split(s, manifest, "train")) for k, s in sides.items()}
    if len(set(digests.values())) != 1:
        raise SystemExit(f"{name}: the two reads differ: {digests}")
    times = measure({k: (lambda s=s: ingest.read_split(s, manifest, "train").materialize())
                     for k, s in sides.items()}, repeats)
    return {"split": name, "images": n, "size": size, "files": len(files), "mib": round(mib, 2),
            "driver_s": times["driver"]["median_s"], "streamed_s": times["streamed"]["median_s"],
            "times_s": {k: v["times_s"] for k, v in times.items()}, "same_rows": True}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, medians (default 3)")
    ap.add_argument("--splits", default="smoke,quick", help=f"comma list of {sorted(SPLITS)}")
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4, as tests)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args(argv)
    names = [s for s in args.splits.split(",") if s]
    if bad := [s for s in names if s not in SPLITS]:
        raise SystemExit(f"--splits: unknown {bad}; expected some of {sorted(SPLITS)}")
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    try:
        rows = []
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"bench_reads_{name}_") as root:
                rows.append(run_split(name, args.repeats, root))
    finally:
        if own:
            ray.shutdown()
    table = markdown_table(
        ["split", "files", "MiB", "driver read (s)", "streamed read (s)", "streamed / driver"],
        [[f"{r['split']} ({r['images']} x {r['size']} px)", str(r["files"]), f"{r['mib']:.1f}",
          f"{r['driver_s']:.2f}", f"{r['streamed_s']:.2f}", f"{r['streamed_s'] / r['driver_s']:.1f}x"] for r in rows])
    payload = {"benchmark": "reads", "machine": machine(), "ray": ray.__version__, "reused_ray": not own,
               "command": "python -m bench.reads " + " ".join(argv if argv is not None else sys.argv[1:]),
               "repeats": args.repeats, "rows": rows}
    return publish(payload, "reads", args.out_dir, table)


if __name__ == "__main__":
    main()
