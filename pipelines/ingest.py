"""Stage ingest: the dataset (BiasedShapes, METHODS §7, or an image folder) -> Parquet shards via Ray Data.

Output: ingest/<split>/*.parquet for split in train, val, test (and dwsol for BiasedShapes), with
columns idx, image (uint8 [3,S,S] tensor), label, mask, box, background, group (+ label2, mask2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipelines import storage as st
from pipelines.common import in_order

log = logging.getLogger("xai.ingest")
STAGE = "ingest"
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_BATCH_FILES = 10  # Ray 2.60's footer batch (RAY_DATA_PARQUET_FOOTER_BATCH_SIZE): files per actor call


def config_hash(cfg: Any) -> str:
    if cfg.data.source == "biased_shapes":
        return cfg.section_hash("data")
    # image folders got a validation split of their own (before: val = test) and Ray Data decoding: a folder
    # ingest committed before then is not reused
    from pipelines.config import digest, section_dump

    return digest({"data": section_dump(cfg, "data"), "ingest": 2})


DECODE_BLOCK_BYTES = 64 * 2**20  # decoded bytes per Ray Data decode task (half Ray Data's 128 MiB target block)
DECODE_MAX_ROWS = 1024  # and at most this many records: a split of 14,400 is 15 tasks for the CPUs to share


def decode_rows(size: int, num_classes: int, multilabel: bool, rows_per_shard: int) -> int:
    """Records per decode task (one Parquet file each): ``rows_per_shard`` or DECODE_MAX_ROWS, or fewer when
    their decoded columns (image 3xSxS + mask SxS, and K class masks + seg when multi-label, in bytes) pass
    DECODE_BLOCK_BYTES: at 64 px 1,024 rows are 16 MiB, at 224 px 334 rows fit. Tasks of 32 rows (the former
    size) spent most of their time in Ray Data's per-task overhead and wrote a file each (450 for 14,400
    images): on 2 cores, 20,000 images at 64 px took 30-33 s warm with 32 rows per task against 14-19 s with
    1,024 (docs/BENCHMARKS.md)."""
    per_row = 4 * size * size + ((num_classes + 1) * size * size if multilabel else 0)
    return max(1, min(rows_per_shard, DECODE_MAX_ROWS, DECODE_BLOCK_BYTES // per_row))


def decode_batch(batch: dict[str, np.ndarray], size: int, num_classes: int, multilabel: bool
                 ) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows {idx, record (``Record.to_json``)} -> the split's columns at ``size`` px."""
    from xai_core.data.datasets import Record, load_record

    rows = [load_record(Record.from_json(rec), size, num_classes, multilabel) for rec in batch["record"]]
    out = {"idx": np.asarray(batch["idx"], np.int64)}
    for k in rows[0]:
        out[k] = np.stack([r[k] for r in rows])
    return out


def listing(cfg: Any) -> Any:
    """The configured real dataset (cub / waterbirds / voc / an image folder) as a datasets.Listing."""
    from xai_core.data.datasets import READERS

    d = cfg.data
    if d.source == "folder":
        return _folder_listing(cfg)
    kw: dict[str, Any] = {"on_bad_input": d.on_bad_input}
    if d.source != "waterbirds":
        kw.update(val_fraction=d.val_fraction, seed=d.seed)
    if d.source == "voc":
        kw.update(test_list=d.test_list, difficult_subset=d.difficult_subset)
    return READERS[d.source](d.root, **kw)


def _dataset_splits(cfg: Any, store: st.Storage, listing: Any) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Records listed on the driver (index files and image headers; an image folder's images checked), then
    decoded, resized and written as Parquet in Ray Data tasks, streaming: the driver never holds the images."""
    from functools import partial

    import ray.data

    from xai_core.data.datasets import SPLITS

    d = cfg.data
    files, rows = {}, {}
    for split in SPLITS:
        recs = listing.records[split]
        if not recs:
            raise ValueError(f"data.root {d.root!r} ({d.source}): the {split} split is empty")
        items = [{"idx": i, "record": r.to_json()} for i, r in enumerate(recs)]
        block = decode_rows(d.size, d.num_classes, d.multilabel, d.rows_per_shard)
        ds = in_order(ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // block))))
        ds = ds.map_batches(partial(decode_batch, size=d.size, num_classes=d.num_classes, multilabel=d.multilabel),
                            batch_size=block)
        write_parquet(store, STAGE, split, ds, max_rows_per_file=d.rows_per_shard)
        files[split] = _files_in_idx_order(store, split)
        rows[split] = len(recs)
        log.info("ingest: %s split, %d rows in %d shard(s)", split, rows[split], len(files[split]))
    return files, rows


def _files_in_idx_order(store: st.Storage, split: str) -> list[str]:
    """The Parquet files Ray Data wrote for a split, ordered by their first idx (its file names are not)."""
    import pyarrow.parquet as pq

    first = {}
    for path in store.list_files(STAGE, split, suffix=".parquet"):
        idx = pq.read_table(path, columns=["idx"], filesystem=store.fs).column("idx")
        first[path[len(store.path()) + 1:]] = int(idx[0].as_py()) if len(idx) else -1
    return sorted((f for f in first if first[f] >= 0), key=first.__getitem__)


def _synthetic_splits(cfg: Any) -> dict[str, dict[str, np.ndarray]]:
    from xai_core.data.synthetic import BiasedShapes

    d = cfg.data
    kw: dict[str, Any] = {"size": d.size, "num_classes": d.num_classes}
    if d.contrast is not None:
        kw["contrast"] = d.contrast
    ml = d.multilabel  # every split multi-label; train keeps its bias (background = the first object's class)
    splits = {
        "train": BiasedShapes(n=d.n_train, seed=d.seed, split="multilabel" if ml else "train", bias=d.bias, **kw),
        "val": BiasedShapes(n=d.n_val, seed=d.seed + 1, split="multilabel" if ml else "test", **kw),
        "test": BiasedShapes(n=d.n_test, seed=d.seed + 2 * ml, split="multilabel" if ml else "test", **kw),
    }
    if d.n_dwsol:
        splits["dwsol"] = BiasedShapes(n=d.n_dwsol, seed=d.seed, split="dwsol", **kw)
    return {k: v.arrays() for k, v in splits.items()}


def _folder_listing(cfg: Any) -> Any:
    """An image folder as a datasets.Listing: every image checked here (decoded once, nothing kept: bad
    input is named or skipped before any work), test = data.test_fraction, val = data.val_fraction of the
    rest (never out of test), seeded by data.seed; decoded and written like the other datasets."""
    from xai_core.data.datasets import Listing, Record
    from xai_core.data.folders import NO_BOX, ImageFolderWithMasks

    d = cfg.data
    ds = ImageFolderWithMasks(d.folder, mask_dir=d.mask_dir, boxes_file=d.boxes_file, on_bad_input=d.on_bad_input)
    if len(ds) == 0:
        raise ValueError(f"data.folder {d.folder!r} holds no readable images")
    if len(ds.classes) > d.num_classes:
        raise ValueError(f"data.folder {d.folder!r} has {len(ds.classes)} classes {ds.classes} but "
                         f"data.num_classes={d.num_classes}; set data.num_classes={len(ds.classes)}")
    perm = np.random.default_rng(d.seed).permutation(len(ds))
    n_test = max(1, int(round(d.test_fraction * len(ds))))
    test, rest = perm[:n_test], perm[n_test:]
    n_val = max(1, int(round(d.val_fraction * len(rest))))
    val, train = rest[:n_val], rest[n_val:]  # validation held out of train, never out of test
    if len(train) == 0:
        raise ValueError(f"data.folder {d.folder!r} has {len(ds)} images: too few to split "
                         f"with test_fraction={d.test_fraction} and val_fraction={d.val_fraction}")

    def record(i: int, split: str) -> Record:
        rel, label = ds.samples[i]
        box = ds.boxes.get(rel, NO_BOX)
        mask = ds._mask_path(rel)
        return Record(path=str(ds.root / rel), split=split, where=f"{ds.root / rel}", label=label,
                      boxes=(tuple(float(v) for v in box),) if box != NO_BOX else (),
                      box_classes=(label,) if box != NO_BOX else (),
                      mask_path=str(mask) if mask is not None else None, mask_threshold=1)

    records = {name: [record(int(i), name) for i in np.sort(idx)]
               for name, idx in (("train", train), ("val", val), ("test", test))}
    return Listing("folder", list(ds.classes), records, skipped=list(ds.skipped))


def _validate(split: str, arrays: dict[str, np.ndarray], num_classes: int) -> None:
    n = len(arrays["label"])
    if n == 0:
        raise ValueError(f"split {split!r} is empty: nothing to train or evaluate on")
    bad = np.flatnonzero((arrays["label"] < 0) | (arrays["label"] >= num_classes))
    if bad.size:
        raise ValueError(f"split {split!r} row {bad[0]}: label {arrays['label'][bad[0]]} is outside "
                         f"0..{num_classes - 1}")
    if arrays["image"].dtype != np.uint8:
        raise ValueError(f"split {split!r}: images must be uint8, got {arrays['image'].dtype}")
    if arrays["mask"].shape[1:] != arrays["image"].shape[2:]:
        raise ValueError(f"split {split!r}: masks {arrays['mask'].shape[1:]} do not match images "
                         f"{arrays['image'].shape[2:]}")


def _arrow_table(arrays: dict[str, np.ndarray]) -> Any:
    """Numpy columns -> a pyarrow Table (fixed-shape arrays become Ray Data tensor columns)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in arrays.items()})


def to_ray_dataset(arrays: dict[str, np.ndarray]) -> Any:
    """Numpy columns -> a Ray Dataset (fixed-shape arrays become tensor columns)."""
    import ray.data

    return ray.data.from_arrow(_arrow_table(arrays))


def write_parquet(store: st.Storage, stage: str, split: str, ds: Any, **options: Any) -> None:
    """``ds.write_parquet`` to <stage>/<split>/ of the store; a failed write names the destination, which the
    store's own error may not (an S3 endpoint lost at a write task's bucket check said only "When testing
    for existence of bucket ..."). Errors about the data pass unchanged: a ValueError, a Ray Data UDF's error
    (a UserCodeException whose text holds the UDF's own error: a record that does not decode, named by its
    file and row; Ray does not carry the original exception object over), and an error that already names
    <stage>/<split>."""
    from ray.exceptions import UserCodeException

    uri = store.uri(stage, split)
    try:
        ds.write_parquet(uri, filesystem=store.fs, **options)
    except Exception as e:
        if isinstance(e, (ValueError, UserCodeException)) or f"{stage}/{split}" in str(e):
            raise
        raise OSError(f"the {split} split of stage {stage} was not written to {uri}: {type(e).__name__}: {e}") from e


def write_split(store: st.Storage, stage: str, split: str, ds: Any, shards: int) -> list[str]:
    """Write a Ray Dataset as ``shards`` Parquet files under <stage>/<split>/ (``write_parquet``: a failed
    write names the destination) and return the files written."""
    write_parquet(store, stage, split, ds.repartition(max(1, shards)))
    return [p[len(store.path()) + 1:] for p in store.list_files(stage, split, suffix=".parquet")]


def write_arrays(store: st.Storage, stage: str, split: str, arrays: dict[str, np.ndarray],
                 rows_per_shard: int) -> list[str]:
    """Numpy columns (in the driver) as Parquet shards of ``rows_per_shard`` rows under <stage>/<split>/;
    returns the files, in row order. Up to ``store.driver_io_mb`` of arrays they are written here with
    pyarrow (no Ray tasks: on the 2-core machine the smoke config's ingest took 12 s through Ray Data);
    more go through ``write_split`` (Ray Data's Parquet writer, its tasks and retries)."""
    n = len(arrays["idx"])
    shards = max(1, -(-n // rows_per_shard))
    if not store.in_driver(sum(v.nbytes for v in arrays.values())):
        return write_split(store, stage, split, to_ray_dataset(arrays), shards)
    import pyarrow.parquet as pq

    table = _arrow_table(arrays)
    store.mkdir(stage, split)
    files = []
    for i in range(shards):
        files.append(f"{stage}/{split}/part-{i:05d}.parquet")
        pq.write_table(table.slice(i * rows_per_shard, rows_per_shard), store.path(files[-1]), filesystem=store.fs)
    return files


def read_split(store: st.Storage, manifest: dict, split: str) -> Any:
    """A Ray Dataset over exactly the files a stage's manifest lists for a split, in their order
    (``common.in_order``: batches, ``limit`` and the first epoch do not depend on which read task finished
    first). A split of at most ``store.driver_io_mb`` is read here with pyarrow, one in-memory block per
    file (no read tasks, no footer-reader actors); a larger one streams through ``read_parquet`` (Ray 2.60
    packs small files into one read task: repartition before an actor pool, see ``common.pool_map``)."""
    import ray.data

    files = [store.path(f) for f in manifest["files"][split]]
    if store.in_driver(split_bytes(store, manifest, split)):
        import pyarrow.parquet as pq

        return in_order(ray.data.from_arrow([pq.read_table(f, filesystem=store.fs) for f in files]))
    with footer_readers(len(files)):
        return in_order(ray.data.read_parquet(files, filesystem=store.fs))


def split_bytes(store: st.Storage, manifest: dict, split: str) -> int:
    """The size of a split's files, as the manifest lists them; a split without files is an error."""
    files = [store.path(f) for f in manifest["files"].get(split, [])]
    if not files:
        raise ValueError(f"stage {manifest['stage']!r} has no files for split {split!r}")
    return sum(i.size or 0 for i in store.fs.get_file_info(files))


def split_manifest(manifest: dict, split: str) -> dict:
    """The part of a stage manifest that names one split's files (what a worker needs to read just it)."""
    return {"stage": manifest["stage"], "files": {split: list(manifest["files"][split])}}


def fit_input(store: st.Storage, manifest: dict, split: str, columns: list[str], limit_bytes: int,
              weights: np.ndarray | None = None) -> Any:
    """What a training fit reads: a split's rows (``columns``, and ``w = weights[idx]`` when given).

    A split of at most ``store.driver_io_mb`` and ``limit_bytes`` (what a worker may hold: its shard cache)
    is described by its files (a dict), and every training worker reads it itself with pyarrow
    (``worker_rows``): no Ray Data split coordinator and read tasks per fit, which on 2 cores made a smoke
    fit wait 3-17 s for its first batch (docs/BENCHMARKS.md). A larger split is a Ray Dataset that Ray Train
    streams into the workers' shards."""
    if store.in_driver(size := split_bytes(store, manifest, split)) and size <= limit_bytes:
        return {"manifest": split_manifest(manifest, split), "split": split, "columns": list(columns),
                "weights": weights}
    ds = read_split(store, manifest, split).select_columns(columns)
    if weights is not None:
        ds = ds.map_batches(_add_weights, fn_kwargs={"w_by_idx": weights}, batch_format="numpy")
    return ds


def _add_weights(batch: dict[str, np.ndarray], w_by_idx: np.ndarray) -> dict[str, np.ndarray]:
    batch["w"] = w_by_idx[batch["idx"]]
    return batch


def worker_rows(store: st.Storage, spec: dict, rank: int, world: int) -> dict[str, np.ndarray]:
    """A training worker's rows of a ``fit_input`` description: the split in ``idx`` order, every
    ``world``-th row from row ``rank`` on, ``rows // world`` of them, so every worker takes the same number
    of steps (as Ray Data's ``streaming_split(equal=True)``); the few rows left over are not trained on,
    as there."""
    cols = read_split_numpy(store, spec["manifest"], spec["split"], columns=spec["columns"])
    if spec.get("weights") is not None:
        cols = _add_weights(cols, np.asarray(spec["weights"]))
    per = len(cols["idx"]) // world
    return {k: v[rank::world][:per] for k, v in cols.items()}


@contextmanager
def footer_readers(n_files: int) -> Iterator[int]:
    """While a Parquet dataset is built: start no more of Ray Data's footer-reader actors than there are
    footer batches to read (``ceil(n_files / 10)``); yields the count used.

    Ray 2.60's Parquet reader (datasource V2) reads the footers on a pool of 32 actors per dataset by
    default, each a Python process to start: on 2 cores, for the 3 files of a split, reading 6,000 training
    images took 5.5-7.0 s warm (12-14 s the first time) against 2.8 s (7.0 s) with one actor, same batches
    and bytes (docs/BENCHMARKS.md). The count is read from the environment when ``read_parquet`` builds the
    dataset (in this process), so it is set around that call only; a value the user exported wins."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield int(os.environ[FOOTER_ACTORS_ENV])
        return
    n = max(1, -(-n_files // FOOTER_BATCH_FILES))
    os.environ[FOOTER_ACTORS_ENV] = str(n)
    try:
        yield n
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


def read_split_numpy(store: st.Storage, manifest: dict, split: str, limit: int | None = None,
                     columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read a split into numpy without Ray tasks (small splits, driver/trial side)."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers the tensor extension type

    tables = []
    rows = 0
    for f in manifest["files"][split]:
        t = pq.read_table(store.path(f), filesystem=store.fs, columns=columns)
        tables.append(t)
        rows += t.num_rows
        if limit is not None and rows >= limit:
            break
    import pyarrow as pa

    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        out[name] = col.to_numpy() if hasattr(col.type, "shape") else col.to_numpy(zero_copy_only=False)
    if "idx" in out:
        order = np.argsort(out["idx"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
    return out


def run(cfg: Any, store: st.Storage, force: bool = False) -> tuple[dict, bool]:
    """Write the dataset splits; returns (manifest, did_work)."""
    h = config_hash(cfg)
    if not force and (m := st.committed(store, STAGE, h)):
        return m, False
    if cfg.data.source != "biased_shapes":
        found = listing(cfg)  # bad input fails here, before the committed ingest is touched
        st.begin(store, STAGE)
        files, rows = _dataset_splits(cfg, store, found)
        manifest = st.commit(store, STAGE, h, rows=rows, files=files, source=cfg.data.source, classes=found.classes,
                             skipped=[{"path": p, "reason": r} for p, r in found.skipped])
        return manifest, True
    splits, skipped = _synthetic_splits(cfg), []
    for name, arrays in splits.items():
        _validate(name, arrays, cfg.data.num_classes)
    st.begin(store, STAGE)
    files, rows = {}, {}
    for name, arrays in splits.items():
        arrays = {"idx": np.arange(len(arrays["label"]), dtype=np.int64), **arrays}
        files[name] = write_arrays(store, STAGE, name, arrays, cfg.data.rows_per_shard)
        rows[name] = int(len(arrays["idx"]))
        log.info("ingest: %s split, %d rows in %d shard(s)", name, rows[name], len(files[name]))
    manifest = st.commit(store, STAGE, h, rows=rows, files=files,
                         schema=sorted(splits["train"].keys()) + ["idx"],
                         skipped=[{"path": p, "reason": r} for p, r in skipped])
    return manifest, True
