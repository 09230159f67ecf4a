"""The actor-pool map every Ray Data stage uses (pipelines.common.pool_map), on the session's local Ray."""

import os
import time
import warnings

import numpy as np


def _pid_actor() -> type:
    """Defined in a function so that Ray pickles the class by value (workers cannot import test modules)."""

    class _PidActor:
        """Records which actor process ran each row and how large its batch was; slow enough per batch that a
        second block queued on the first ready actor would wait behind the first one."""

        def __init__(self, threads: int) -> None:
            self.threads = threads

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            time.sleep(4.0)
            n = len(batch["id"])
            return {"id": batch["id"], "pid": np.full(n, os.getpid()), "batch_rows": np.full(n, n),
                    "threads": np.full(n, self.threads)}

    return _PidActor


def test_pool_map_gives_every_actor_a_block_and_caps_batches_at_a_block(ray_session):
    import ray.data

    from pipelines.common import pool_map, resource_plan

    plan = resource_plan(4, num_workers=1, actors=2)  # the session's Ray has 4 CPUs: 2 actors of 1 CPU
    src = ray.data.from_items([{"id": i} for i in range(10)], override_num_blocks=1)  # one block, as read_parquet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pool_map(src, _pid_actor(), {}, rows=10, plan=plan, batch_size=64)
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]  # bounded restarts, no warning
    rows = ds.take_all()

    assert sorted(int(r["id"]) for r in rows) == list(range(10))  # every row exactly once
    # batch_size 64 > a block of 5 rows: without the cap Ray Data bundles both blocks into one batch of 10
    assert max(int(r["batch_rows"]) for r in rows) == 5
    assert len({int(r["pid"]) for r in rows}) == 2  # both actors worked (one block each)
    assert {int(r["threads"]) for r in rows} == {1}  # threads = the plan's actor CPUs
