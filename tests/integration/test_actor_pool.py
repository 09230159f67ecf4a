"""The actor-pool map every Ray Data stage uses (pipelines.common.pool_map), on the session's local Ray."""

import os
import time
import warnings

import numpy as np


def _pid_actor() -> type:
    """Defined in a function so that Ray pickles the class by value (workers cannot import test modules)."""

    class _PidActor:
        """Records which actor process ran each row, the batch it was in (its first id) and the batch size.
        With ``rendezvous`` (a folder and a count) a batch waits until that many actor processes have a batch
        in hand: two blocks queued on the first ready actor would then never meet (the wait's deadline only
        bounds that hang, and the test fails on the PIDs)."""

        def __init__(self, threads: int, rendezvous: tuple[str, int] | None = None) -> None:
            self.threads, self.rendezvous = threads, rendezvous

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if self.rendezvous:
                folder, count = self.rendezvous
                open(os.path.join(folder, str(os.getpid())), "w").close()
                deadline = time.monotonic() + 60
                while len(os.listdir(folder)) < count and time.monotonic() < deadline:
                    time.sleep(0.05)
            n = len(batch["id"])
            return {"id": batch["id"], "pid": np.full(n, os.getpid()), "batch_rows": np.full(n, n),
                    "batch_first": np.full(n, int(batch["id"][0])), "threads": np.full(n, self.threads)}

    return _PidActor


def _run(rows: int, batch_size: int, actors: int, rendezvous: tuple[str, int] | None = None,
         src: object = None) -> list[dict]:
    import ray.data

    from pipelines.common import pool_map, resource_plan

    plan = resource_plan(4, num_workers=1, actors=actors)  # the session's Ray has 4 CPUs
    if src is None:  # one block, as read_parquet
        src = ray.data.from_items([{"id": i} for i in range(rows)], override_num_blocks=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pool_map(src, _pid_actor(), {"rendezvous": rendezvous}, rows=rows, plan=plan, batch_size=batch_size)
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]  # bounded restarts, no warning
    out = ds.take_all()
    assert sorted(int(r["id"]) for r in out) == list(range(rows))  # every row exactly once
    assert {int(r["threads"]) for r in out} == {1}  # threads = the plan's actor CPUs
    return out


def test_pool_map_one_block_per_batch_spread_over_the_actors(ray_session, tmp_path):
    out = _run(rows=10, batch_size=5, actors=2, rendezvous=(str(tmp_path), 2))
    assert sorted({(int(r["batch_first"]), int(r["batch_rows"])) for r in out}) == [(0, 5), (5, 5)]
    assert len({int(r["pid"]) for r in out}) == 2  # both actors worked, one batch each


def test_pool_map_batches_do_not_depend_on_the_number_of_actors(ray_session):
    # 23 rows, batch 5: ceil(23/5) = 5 contiguous blocks of 4 or 5 rows (Ray's equal split), whatever the pool size
    layouts = []
    for actors in (1, 3):
        out = _run(rows=23, batch_size=5, actors=actors)
        layouts.append({int(r["id"]): int(r["batch_first"]) for r in out})
    assert layouts[0] == layouts[1]
    batches: dict[int, list[int]] = {}
    for i, first in sorted(layouts[0].items()):
        batches.setdefault(first, []).append(i)
    assert len(batches) == 5
    for first, ids in batches.items():
        assert ids == list(range(first, first + len(ids))) and len(ids) in (4, 5)  # contiguous, one block each


def _first_block_last(marker: str) -> object:
    """A map whose first block finishes after the second, as a larger first file's read does: the first
    waits (at most 60 s) for the marker file the second writes, then 1 s more (Ray Data collects the
    outputs that finished within one scheduling round in block order). Pickled by value."""

    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if int(batch["id"][0]) == 0:
            deadline = time.time() + 60
            while not os.path.exists(marker) and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        else:
            open(marker, "w").close()
        return batch

    return fn


def _batch_layout(ordered: bool, marker: str) -> dict[int, int]:
    import ray.data

    from pipelines.common import in_order

    src = ray.data.from_items([{"id": i} for i in range(12)], override_num_blocks=2)
    if ordered:
        src = in_order(src)
    src = src.map_batches(_first_block_last(marker), batch_size=None)  # two tasks, one per block
    out = _run(rows=12, batch_size=4, actors=1, src=src)
    return {int(r["id"]): int(r["batch_first"]) for r in out}


def test_pool_map_batches_do_not_depend_on_which_read_finished_first(ray_session, tmp_path):
    # Without preserve_order the block of ids 6-11 reaches the cut first: batches [6..9], [10, 11, 0, 1], ...
    # (blocks out of order made two smoke runs of 502467a differ in the precompute E).
    assert _batch_layout(False, str(tmp_path / "a")) != {i: i - i % 4 for i in range(12)}
    assert _batch_layout(True, str(tmp_path / "b")) == {i: i - i % 4 for i in range(12)}  # [0..3], [4..7], [8..11]
