"""One side of ``python -m bench.evaluate --against REV``: the evaluate UDF of the source tree TREE, timed.

    python bench/_evaluate_side.py TREE WORK_DIR REPEATS

Run by bench/evaluate.py in a fresh process per side and round, with TREE (a checkout: this one, or a git
worktree of REV) first on sys.path, so ``pipelines`` and ``xai_core`` are that tree's. It uses only what the
stage's API has had since d782e21 (``load_config``, ``Config``, ``Storage``, ``EvalActor``) and nothing of
bench/, which the other tree may lack. WORK_DIR holds what the driver wrote: ``side.json`` (the config sections
and keys to set, the alphas, the model key), ``batch.npz`` (the batch, as ingest writes it) and ``model.pt``.
The tree's default config gets the keys it has; the keys it lacks are listed in the output, so that the driver
can say the two sides did not run the same work. One untimed call, then REPEATS timed calls of the same batch;
writes ``<WORK_DIR>/out_<tag>.npz`` with the times and the rows of the last call.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(tree: str, work: str, repeats: int, tag: str) -> None:
    sys.path.insert(0, os.path.abspath(tree))
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import pipelines
    from pipelines.config import Config, load_config
    from pipelines.evaluate import EvalActor
    from pipelines.storage import Storage

    here = os.path.dirname(os.path.abspath(pipelines.__file__))
    if not here.startswith(os.path.abspath(tree)):
        raise SystemExit(f"pipelines imported from {here}, not from the tree {tree}")
    spec = json.loads(open(os.path.join(work, "side.json")).read())
    data = load_config(None).model_dump(mode="json")
    missing = []
    for section, values in spec["config"].items():
        for k, v in values.items():
            if section in data and k in data[section]:
                data[section][k] = v
            else:
                missing.append(f"{section}.{k}")
    cfg = Config.model_validate(data)
    batch = dict(np.load(os.path.join(work, "batch.npz")))
    actor = EvalActor(cfg.model_dump(mode="json"), Storage(work).args(), {spec["model_key"]: "model.pt"},
                      spec["alphas"], "test", threads=1)
    actor(batch)  # untimed: lazy init, allocator, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = actor(batch)
        times.append(time.perf_counter() - t0)
    keep = {k: v for k, v in rows.items() if np.asarray(v).dtype.kind in "fiub" or k == "method"}
    np.savez(os.path.join(work, f"out_{tag}.npz"), times=np.array(times), missing=np.array(missing, dtype=str),
             **{f"col_{k}": np.asarray(v) for k, v in keep.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
