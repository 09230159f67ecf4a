"""Keep a run's committed work where a later session finds it, and put it back.

A run directory (``runs/<name>``) is ignored by git, so a long run cut short by the end of a session (or
the machine it ran on) loses everything it had committed. ``save`` copies each committed unit of a run (a
directory holding a ``_manifest.json``: a whole stage, or one model of train, one precompute round, one
evaluate shard) to a directory that is committed to git, ``artifacts/<name>`` by default; ``restore``
copies back the units the run directory lacks, so the pipeline skips them and resumes after the last one.

    python -m pipelines.keep save    --config configs/paper.yaml   # after (or while) a run commits units
    python -m pipelines.keep restore --config configs/paper.yaml   # before the run, on a fresh checkout

Left out: ``ingest`` (rebuilt from the config: the synthetic benchmark is seeded, bit for bit; a folder
source reads the same files again), ``report`` (cheap, rebuilt from evaluate), and the training images a
precompute round holds (``samples``, 165 MB a round in the paper config): a round is kept as its manifest
and weights.parquet (what the report reads), marked ``kept_without``, and only once the consistency model it
trained is committed; precompute redoes a round kept so if it is ever needed again. The round checkpoints
lying loose in train/ travel with train once it is committed; the ERM warm-ups (warmups/) are not kept: a
restored run that still has to train a consistency model retrains its warm-up. A knob-sweep trial's folder
(tune/<mode>/trials/...) is kept with its mode once that is committed, as the trial left it (manifests and
weights, its models only with tune.keep_models). A unit is copied to a temporary sibling and renamed
into place, so a killed ``save`` leaves either the old unit or the new one. Units whose config hash no
longer matches are still copied: the pipeline compares hashes and redoes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.fs as pafs  # noqa: E402

from pipelines import storage as st  # noqa: E402

log = logging.getLogger("xai")
LEFT_OUT = ("ingest", "report")


def units(store: st.Storage) -> list[str]:
    """Committed units of a run, as paths relative to its root (outermost only: a committed stage is one
    unit with its parts inside), without the stages in LEFT_OUT."""
    found: list[str] = []

    def walk(rel: str) -> None:
        if rel and store.exists(rel, st.MANIFEST):
            found.append(rel)
            return
        if UNFINISHED_TRIAL.fullmatch(rel):  # a knob-sweep trial still training: redone, never half kept
            return
        sel = pafs.FileSelector(store.path(rel), allow_not_found=True)
        for info in sorted(store.fs.get_file_info(sel), key=lambda i: i.base_name):
            if info.type == pafs.FileType.Directory and not (not rel and info.base_name in LEFT_OUT):
                walk(f"{rel}/{info.base_name}" if rel else info.base_name)

    walk("")
    return found


# a training-knob trial's folder is one unit once it committed (its models and training images are gone by then)
UNFINISHED_TRIAL = re.compile(r"tune/[^/]+/trials/[^/]+")
SLIM = {"precompute": "samples"}  # stage -> the file list of its units that is not kept


def _slim(manifest: bytes, drop: str) -> bytes:
    m = json.loads(manifest)
    m["files"] = {**m["files"], drop: []}
    m["kept_without"] = drop
    return json.dumps(m, indent=2, sort_keys=True).encode()


def _consumer_committed(store: st.Storage, rel: str) -> bool:
    """A precompute round (precompute/s<seed>_round<r>) is kept once train/consistency_s<seed> is committed."""
    seed = rel.split("/")[1].split("_round")[0].lstrip("s")
    return store.exists(f"train/consistency_s{seed}", st.MANIFEST) or store.exists("train", st.MANIFEST)


def save(store: st.Storage, kept: Path) -> list[str]:
    """Copy every committed unit the kept directory lacks or holds in another version; returns them."""
    copied = []
    for rel in units(store):
        dest = kept / rel
        original = manifest = store.read_bytes(rel, st.MANIFEST)
        drop = SLIM.get(rel.split("/")[0]) if "/" in rel else None
        if drop:
            if not _consumer_committed(store, rel):
                continue
            manifest = _slim(original, drop)
        if (dest / st.MANIFEST).is_file() and (dest / st.MANIFEST).read_bytes() == manifest:
            continue
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        src = store.path(rel)
        left_out = {store.path(f) for f in json.loads(original)["files"].get(drop, [])} if drop else set()
        for path in store.list_files(rel):
            if path in left_out:
                continue
            out = tmp / path[len(src) + 1:]
            out.parent.mkdir(parents=True, exist_ok=True)
            with store.fs.open_input_stream(path) as f:
                out.write_bytes(manifest if path == store.path(rel, st.MANIFEST) else f.read())
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        copied.append(rel)
    return copied


def restore(kept: Path, store: st.Storage) -> list[str]:
    """Copy back the kept units the run directory has no committed version of; returns them."""
    if not kept.is_dir():
        return []
    back = []
    for unit in sorted(p.parent for p in kept.rglob(st.MANIFEST)):
        rel = unit.relative_to(kept).as_posix()
        if any(rel == b or rel.startswith(f"{b}/") for b in back) or _committed_above(store, rel):
            continue
        store.remove_dir(rel)  # leftovers of an attempt that died before committing
        files = sorted(p for p in unit.rglob("*") if p.is_file() and p.name != st.MANIFEST)
        # the manifests of the units inside (a committed stage's models, shards, checks) after every file, the
        # innermost first, the unit's own last: it counts only once it is whole, and so does each part of it,
        # so that a stage run again (its own manifest stale) still skips the parts committed under its hash
        inner = sorted((p for p in unit.rglob(st.MANIFEST) if p != unit / st.MANIFEST),
                       key=lambda p: (-len(p.parts), p.as_posix()))
        for p in files + inner + [unit / st.MANIFEST]:
            store.write_bytes(p.read_bytes(), rel, p.relative_to(unit).as_posix())
        back.append(rel)
    return back


def _committed_above(store: st.Storage, rel: str) -> bool:
    """Whether the run directory already holds a committed version of this unit or of one around it."""
    parts = rel.split("/")
    return any(store.exists(*parts[:i], st.MANIFEST) for i in range(1, len(parts) + 1))


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m pipelines.keep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["save", "restore"])
    p.add_argument("--config", default="configs/paper.yaml", help="the run's config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for full.py")
    p.add_argument("--dir", type=Path, help="the kept directory (default: artifacts/<run name>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store = st.from_config(cfg)
    kept = args.dir or Path.cwd() / "artifacts" / cfg.name
    did = save(store, kept) if args.action == "save" else restore(kept, store)
    where = f"{store.root_uri} -> {kept}" if args.action == "save" else f"{kept} -> {store.root_uri}"
    log.info("keep %s (%s): %d unit(s)%s", args.action, where, len(did), "".join(f"\n  {u}" for u in did))
    return 0


if __name__ == "__main__":
    sys.exit(main())
