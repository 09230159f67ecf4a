"""Precompute stage throughput: the Ray Data actor pool of pipelines/precompute.py against a plain loop.

    python -m bench.stages                      # quick config, 1024 images at 64 px, actor pools of 1 and 2
    python -m bench.stages --tiny               # seconds: 64 images at 32 px, 1 repeat (keeps the script alive)
    python -m bench.stages --n 2048 --repeats 5

The timed call is the stage's own: ``precompute.consistency_map`` (``pipelines.common.pool_map``: one
block per batch of ``precompute.batch_size`` rows, one block per actor at a time) as in
``precompute.run_round``, over the training split as
``ingest.read_split`` reads it:
BiasedShapes (uint8 images) in ingest's Parquet layout, written with pyarrow to a temp local Storage
beside an untrained model's checkpoint (``state_bytes({"model": ...})``). The input is materialised
before timing and the output is materialised inside it, so each timed call = actor-pool start
(processes, imports, checkpoint load) + the map. The actors' CPUs come from
``pipelines.common.resource_plan`` (1 CPU and 1 torch thread each on the default ``ray.init(num_cpus=3)``:
a CPU stays free for Ray Data, RAY_NOTES). The baseline is a plain in-process loop that builds one
``ConsistencyActor`` (1 torch thread) and calls it on the same batches: one process, so "2 actors" is
compared with it at twice its CPUs.

An actor pool hands whole input blocks to its actors. On Ray 2.60 ``read_parquet`` bin-packs Parquet row
groups into read units of up to 128 MiB and ignores ``override_num_blocks``: the stage read one block
and only one actor worked (found with this benchmark). ``consistency_map`` now repartitions its input
into one block per batch; the repartition is inside the timed call.

One untimed warm-up round runs every path first (--tiny: the 1-actor pool only); its pools are
instrumented: the actors' peak RSS (VmHWM), the pool start and the images/s once started. Rows out == rows
in is checked for every call. A Ray instance already running in the process is reused (and left
running); otherwise one is started and shut down.

Targets (the issue): 2 actors >= 1.7x the images/s of 1 actor; 1 actor within 1.3x of the plain loop
(plain / 1 actor <= 1.3). Writes bench/results/stages.json (stages_tiny.json with --tiny) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._timing import fix_threads, machine, markdown_table, measure, publish
from pipelines import ingest
from pipelines.common import batch_count, make_model, resource_plan, state_bytes
from pipelines.config import ROOT, Config, load_config
from pipelines.precompute import ConsistencyActor, actor_kwargs, consistency_map, write_samples
from pipelines.storage import Storage

COLUMNS = ["idx", "image", "label", "group", "mask"]  # what run_round selects before the map
CKPT = "train/bench_untrained.pt"
TARGET_SCALING = 1.7  # images/s of 2 actors over 1 actor, at least
TARGET_OVERHEAD = 1.3  # images/s of the plain loop over 1 actor, at most


def bench_config(config: str, n: int, size: int, batch_size: int | None) -> Config:
    """The pipeline config the stage would run with, resized for the benchmark."""
    over = [f"data.n_train={n}", f"data.size={size}"]
    if batch_size is not None:
        over.append(f"precompute.batch_size={batch_size}")
    return load_config(config, over)


def prepare_store(cfg: Config, root: str) -> tuple[Storage, dict]:
    """The training split as ingest writes it (Parquet shards of ``rows_per_shard`` rows, the table of
    ``ingest.to_ray_dataset``: tensor columns) and an untrained checkpoint, in a local Storage at ``root``.

    The shards are written with pyarrow directly (no Ray tasks: seconds fewer); returns (store, manifest)
    with ``manifest["files"]["train"]`` listing them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from xai_core.data.synthetic import BiasedShapes

    d = cfg.data
    kw: dict[str, Any] = {"size": d.size, "num_classes": d.num_classes}
    if d.contrast is not None:
        kw["contrast"] = d.contrast
    arrays = BiasedShapes(n=d.n_train, seed=d.seed, split="train", bias=d.bias, **kw).arrays()
    arrays = {"idx": np.arange(len(arrays["label"]), dtype=np.int64), **arrays}
    table = pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in arrays.items()})
    store = Storage(root)
    store.mkdir(ingest.STAGE, "train")
    files = []
    for i, start in enumerate(range(0, d.n_train, d.rows_per_shard)):
        files.append(f"{ingest.STAGE}/train/part-{i:05d}.parquet")
        pq.write_table(table.slice(start, d.rows_per_shard), store.path(files[-1]), filesystem=store.fs)
    torch.manual_seed(d.seed)
    store.write_bytes(state_bytes({"model": make_model(cfg).state_dict()}), CKPT)
    return store, {"stage": ingest.STAGE, "files": {"train": files}, "rows": {"train": d.n_train}}


def stage_map(src: Any, cfg: Config, store: Storage, actors: int, cluster_cpus: float,
              udf: type = ConsistencyActor) -> Any:
    """The stage's map over ``src`` (precompute.consistency_map, repartition included) for ``actors`` actors."""
    plan = resource_plan(cluster_cpus, num_workers=1, actors=actors)
    return consistency_map(src, cfg, store, CKPT, plan, cfg.data.n_train, udf=udf)


def _instrumented_actor() -> type:
    """ConsistencyActor plus columns for the warm-up round: the process's peak RSS (MiB), when the actor was
    ready (checkpoint loaded), when each batch ended and its process id. Defined in a function so that Ray pickles it by
    value (workers need not import ``bench``); the timed rounds use ConsistencyActor itself."""

    class InstrumentedConsistencyActor(ConsistencyActor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            import time as _time

            super().__init__(*args, **kwargs)
            self._ready = _time.time()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            import os
            import resource
            import sys as _sys
            import time as _time

            out = super().__call__(batch)
            mib = None
            try:  # this process image's peak (Linux): ru_maxrss keeps the forking parent's peak across exec
                with open("/proc/self/status") as f:
                    mib = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
            except (OSError, StopIteration, ValueError):
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                mib = peak / 2**20 if _sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
            rows = len(out["idx"])
            out.update(_rss_mib=np.full(rows, mib), _ready_ts=np.full(rows, self._ready),
                       _end_ts=np.full(rows, _time.time()), _pid=np.full(rows, os.getpid()))
            return out

    return InstrumentedConsistencyActor


def _warmup_pool(src: Any, cfg: Config, store: Storage, k: int, cluster_cpus: float) -> dict:
    """One untimed, instrumented pool run: rows out, the actors' peak RSS, the time until the first actor
    was ready, and images/s once started (sum over the actors of rows / (last batch end - ready))."""
    t0 = time.time()
    ds = stage_map(src, cfg, store, k, cluster_cpus, udf=_instrumented_actor())
    cols = ["_rss_mib", "_ready_ts", "_end_ts", "_pid"]
    parts = list(ds.select_columns(cols).iter_batches(batch_format="numpy", batch_size=None))
    got = {c: np.concatenate([p[c] for p in parts]) for c in cols}
    rate = 0.0
    for pid in np.unique(got["_pid"]):
        mine = got["_pid"] == pid
        rate += int(mine.sum()) / max(float(got["_end_ts"][mine].max() - got["_ready_ts"][mine].min()), 1e-9)
    return {"rows": len(got["_pid"]), "peak_rss_mib": float(got["_rss_mib"].max()),
            "pool_start_s": float(got["_ready_ts"].min()) - t0, "images_per_s_after_start": rate,
            "busy_actors": len(np.unique(got["_pid"]))}


@dataclass
class TimedPath:
    """One timed path: the plain loop (actors=0) or a pool of ``actors`` over an input of ``blocks`` blocks."""

    key: str
    label: str
    actors: int
    src: Any = None
    blocks: int | None = None
    write: bool = False  # the whole round as run_round runs it (precompute.write_samples), not only the map


def run(cfg: Config, actor_counts: list[int], repeats: int, warmup: str = "all", write: bool = False) -> dict:
    """A warm-up round (``warmup``: "all" paths, "one" = the 1-actor pool only, "none"), then ``repeats``
    interleaved timed rounds; checks rows out == rows in; returns the payload's result fields. ``write``
    adds, per actor count, the stage's whole round without MLflow (``precompute.write_samples``: read the
    Parquet split, the map, the Parquet write of every per-sample column, the read-back of E and v)."""
    import ray

    cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
    n = cfg.data.n_train
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_stages_") as tmp:
        store, manifest = prepare_store(cfg, tmp)
        # The stage's read (one block here: Ray 2.60 packs small Parquet files into one read task); the
        # stage's map repartitions it into one block per batch itself.
        src = ingest.read_split(store, manifest, "train").select_columns(COLUMNS)
        src = src.materialize()
        paths = [TimedPath("plain", "plain loop (1 process)", 0)]
        for k in actor_counts:
            name = f"{k} actor{'s' if k > 1 else ''}"
            paths.append(TimedPath(name, name, k, src, batch_count(cfg.data.n_train, cfg.precompute.batch_size)))
        if write:
            paths += [TimedPath(f"{k} actor{'s' if k > 1 else ''} + write", f"{k} actor{'s' if k > 1 else ''}: "
                                "read, map, write (write_samples)", k, None,
                                batch_count(cfg.data.n_train, cfg.precompute.batch_size), write=True)
                      for k in actor_counts]
        batches = list(src.iter_batches(batch_size=cfg.precompute.batch_size, batch_format="numpy"))
        kwargs = {**actor_kwargs(cfg, store, CKPT), "threads": 1}
        print(f"  input ready in {time.perf_counter() - t0:.1f}s: {len(manifest['files']['train'])} Parquet "
              f"file(s), {src.num_blocks()} block(s), {len(batches)} batches", flush=True)
        rows_out: list[tuple[str, int]] = []  # (path, rows) of every call

        def plain() -> int:
            udf = ConsistencyActor(**kwargs)
            rows_out.append(("plain", sum(len(udf(b)["idx"]) for b in batches)))
            return rows_out[-1][1]

        def pool(p: TimedPath) -> Callable[[], int]:
            def call() -> int:
                if p.write:
                    stage = f"precompute/bench_{len(rows_out)}"
                    plan = resource_plan(cluster_cpus, num_workers=1, actors=p.actors)
                    _, cols = write_samples(cfg, store, manifest, CKPT, plan, stage)
                    store.remove_dir(stage)
                    rows_out.append((p.key, len(cols["idx"])))
                else:
                    rows_out.append((p.key, stage_map(p.src, cfg, store, p.actors, cluster_cpus).materialize()
                                     .count()))
                return rows_out[-1][1]
            return call

        warm: dict[str, dict] = {}
        for p in paths:
            if (warmup == "all" and not p.write) or (warmup == "one" and p.key == "1 actor"):
                t1 = time.perf_counter()
                if p.actors == 0:
                    warm[p.key] = {"rows": plain()}
                else:
                    warm[p.key] = _warmup_pool(p.src, cfg, store, p.actors, cluster_cpus)
                    rows_out.append((p.key, warm[p.key]["rows"]))
                print(f"  warm-up {p.label}: {time.perf_counter() - t1:.1f}s", flush=True)
        res = measure({p.key: plain if p.actors == 0 else pool(p) for p in paths}, repeats, warmup=0)
    bad = {key: got for key, got in rows_out if got != n}
    if bad:  # a broken map would time as fast
        raise RuntimeError(f"precompute maps returned {bad} rows for {n} images")
    rows = []
    for p in paths:
        r, w = res[p.key], warm.get(p.key, {})
        plan = resource_plan(cluster_cpus, num_workers=1, actors=p.actors) if p.actors else None
        rows.append({"key": p.key, "name": p.label, "actors": p.actors, "input_blocks": p.blocks,
                     "actor_cpus": plan.actor_cpus if plan else None,
                     "torch_threads": max(1, int(plan.actor_cpus)) if plan else 1,
                     "median_s": r["median_s"], "images_per_s": n / r["median_s"], "times_s": r["times_s"],
                     "peak_rss_mib": w.get("peak_rss_mib"), "warmup_pool_start_s": w.get("pool_start_s"),
                     "warmup_images_per_s_after_start": w.get("images_per_s_after_start"),
                     "warmup_busy_actors": w.get("busy_actors")})
    return {"rows": rows, "ratios": ratios(rows), "cluster_cpus": cluster_cpus,
            "input_files": len(manifest["files"]["train"])}


def ratios(rows: list[dict]) -> dict[str, dict]:
    """plain / 1 actor and 2 actors / 1 actor."""
    ips = {r["key"]: r["images_per_s"] for r in rows}
    out: dict[str, dict] = {}
    if "1 actor" not in ips:
        return out
    v = ips["plain"] / ips["1 actor"]
    out["plain_over_1_actor"] = {"label": "plain loop / 1 actor (images/s)", "value": v,
                                 "target": f"<= {TARGET_OVERHEAD}", "met": v <= TARGET_OVERHEAD}
    for key, label in (("2 actors", "2 actors / 1 actor (images/s)"),):
        if key in ips:
            v = ips[key] / ips["1 actor"]
            out[key.replace(" ", "_").replace("(", "").replace(")", "") + "_over_1_actor"] = {
                "label": label, "value": v, "target": f">= {TARGET_SCALING}", "met": v >= TARGET_SCALING}
    return out


def table(out: dict) -> str:
    def opt(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["path", "actors x CPUs", "input blocks", "torch threads", "median s", "images/s",
              "warm-up: first actor ready s", "warm-up: busy actors", "warm-up: images/s once started",
              "actor peak RSS MiB"]
    body = [[r["name"], "-" if not r["actors"] else f"{r['actors']} x {r['actor_cpus']:g}",
             opt(r["input_blocks"], "d"), str(r["torch_threads"]), f"{r['median_s']:.2f}",
             f"{r['images_per_s']:.1f}", opt(r["warmup_pool_start_s"], ".2f"), opt(r["warmup_busy_actors"], "d"),
             opt(r["warmup_images_per_s_after_start"], ".1f"), opt(r["peak_rss_mib"], ".0f")] for r in out["rows"]]
    ratio_rows = [[v["label"], f"{v['value']:.2f}", v["target"], "yes" if v["met"] else "**no**"]
                  for v in out["ratios"].values()]
    return markdown_table(header, body) + "\n\n" + markdown_table(["ratio", "value", "target", "met"], ratio_rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="64 images at 32 px, 1 repeat: a seconds-long smoke run")
    ap.add_argument("--config", default=str(ROOT / "configs/quick.yaml"), help="pipeline config (default quick)")
    ap.add_argument("--n", type=int, default=None, help="images (default 1024; --tiny 64)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 64; --tiny 32)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="precompute batch size (default: the config's; --tiny 16, so that 2 actors get work)")
    ap.add_argument("--actors", default="1,2", help="comma list of actor-pool sizes (default 1,2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds, medians (default 3; --tiny 1)")
    ap.add_argument("--warmup", choices=["all", "one", "none"], default=None,
                    help="untimed, instrumented warm-up round: every path (default), the 1-actor pool only "
                         "(--tiny default), or none")
    ap.add_argument("--write", action="store_true",
                    help="also time the whole round per actor count: read, map and Parquet write "
                         "(precompute.write_samples)")
    ap.add_argument("--ray-cpus", type=int, default=3,
                    help="logical CPUs of the local Ray instance started here (default 3)")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = ap.parse_args(argv)
    if args.tiny:
        n, size, batch, repeats = args.n or 64, args.size or 32, args.batch_size or 16, args.repeats or 1
    else:
        n, size, batch, repeats = args.n or 1024, args.size or 64, args.batch_size, args.repeats or 3
    warmup = args.warmup or ("one" if args.tiny else "all")
    counts = sorted({int(k) for k in args.actors.split(",") if k})
    if not counts or min(counts) < 1:
        raise SystemExit(f"--actors {args.actors!r}: need actor counts >= 1")
    fix_threads(1)
    cfg = bench_config(args.config, n, size, batch)

    import ray

    own = not ray.is_initialized()
    if own:
        env = {"RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0")}
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    try:
        print(f"precompute: {n} images {size}px, batch {cfg.precompute.batch_size}, {cfg.model.arch} width "
              f"{cfg.model.width}, consistency steps {cfg.consistency.steps}, actors {counts}, "
              f"repeats={repeats}, warm-up {warmup}, Ray CPUs {ray.cluster_resources().get('CPU')}", flush=True)
        out = run(cfg, counts, repeats, warmup, args.write)
    finally:
        if own:
            ray.shutdown()
    payload = {"benchmark": "stages", "stage": "precompute", "tiny": args.tiny, "machine": machine(),
               "ray": ray.__version__, "reused_ray": not own,
               "command": "python -m bench.stages " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": {"file": Path(args.config).name, "n": n, "size": size,
                          "batch_size": cfg.precompute.batch_size, "arch": cfg.model.arch, "width": cfg.model.width,
                          "rows_per_shard": cfg.data.rows_per_shard,
                          "consistency": cfg.consistency.model_dump(mode="json")},
               "repeats": repeats, "warmup": warmup, **out,
               "notes": ["each actor-pool call includes starting the pool (processes, imports, checkpoint load)",
                         "warm-up columns come from the untimed, instrumented warm-up round (a cold pool start; "
                         "peak RSS = VmHWM of the actor's process)",
                         "input blocks: the stage's map repartitions its input into one block per batch "
                         "(Ray 2.60's read_parquet packs small files into one block)",
                         "'+ write' rows (--write): precompute.write_samples, i.e. the Parquet read of the split, "
                         "the map, the Parquet write of every per-sample column and the read-back of E and v; "
                         "never warmed up",
                         "the plain loop is one process with 1 torch thread; its call includes building "
                         "ConsistencyActor (checkpoint load)",
                         f"targets: 2 actors >= {TARGET_SCALING}x 1 actor; plain / 1 actor <= {TARGET_OVERHEAD}"]}
    return publish(payload, "stages_tiny" if args.tiny else "stages", args.out_dir, table(out))


if __name__ == "__main__":
    main()
