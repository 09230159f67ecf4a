"""The actor-pool map every Ray Data stage uses (pipelines.common.pool_map), on the session's local Ray."""

import os
import time
import warnings

import numpy as np


def _pid_actor() -> type:
    """Defined in a function so that Ray pickles the class by value (workers cannot import test modules)."""

    class _PidActor:
        """Records which actor process ran each row, the batch it was in (its first id) and the batch size;
        ``delay`` seconds per batch, so that a second block queued on the first ready actor would wait."""

        def __init__(self, threads: int, delay: float) -> None:
            self.threads, self.delay = threads, delay

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            time.sleep(self.delay)
            n = len(batch["id"])
            return {"id": batch["id"], "pid": np.full(n, os.getpid()), "batch_rows": np.full(n, n),
                    "batch_first": np.full(n, int(batch["id"][0])), "threads": np.full(n, self.threads)}

    return _PidActor


def _run(rows: int, batch_size: int, actors: int, delay: float) -> list[dict]:
    import ray.data

    from pipelines.common import pool_map, resource_plan

    plan = resource_plan(4, num_workers=1, actors=actors)  # the session's Ray has 4 CPUs
    src = ray.data.from_items([{"id": i} for i in range(rows)], override_num_blocks=1)  # one block, as read_parquet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pool_map(src, _pid_actor(), {"delay": delay}, rows=rows, plan=plan, batch_size=batch_size)
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]  # bounded restarts, no warning
    out = ds.take_all()
    assert sorted(int(r["id"]) for r in out) == list(range(rows))  # every row exactly once
    assert {int(r["threads"]) for r in out} == {1}  # threads = the plan's actor CPUs
    return out


def test_pool_map_one_block_per_batch_spread_over_the_actors(ray_session):
    out = _run(rows=10, batch_size=5, actors=2, delay=4.0)
    assert sorted({(int(r["batch_first"]), int(r["batch_rows"])) for r in out}) == [(0, 5), (5, 5)]
    assert len({int(r["pid"]) for r in out}) == 2  # both actors worked, one batch each


def test_pool_map_batches_do_not_depend_on_the_number_of_actors(ray_session):
    # 23 rows, batch 5: ceil(23/5) = 5 contiguous blocks of 4 or 5 rows (Ray's equal split), whatever the pool size
    layouts = []
    for actors in (1, 3):
        out = _run(rows=23, batch_size=5, actors=actors, delay=0.0)
        layouts.append({int(r["id"]): int(r["batch_first"]) for r in out})
    assert layouts[0] == layouts[1]
    batches: dict[int, list[int]] = {}
    for i, first in sorted(layouts[0].items()):
        batches.setdefault(first, []).append(i)
    assert len(batches) == 5
    for first, ids in batches.items():
        assert ids == list(range(first, first + len(ids))) and len(ids) in (4, 5)  # contiguous, one block each
