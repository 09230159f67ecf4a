"""read_split: the manifest's files in order; a small split read by the driver, a large one streamed with no
more footer-reader actors than footer batches; both give the same rows."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import ingest
from pipelines import storage as st


def _footer_actor_ids() -> set[str]:
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this session's Ray: another may run on the machine
    return {a.actor_id for a in list_actors(address=gcs, filters=[("class_name", "=", "FooterReader")],
                                           limit=10_000, raise_on_missing_output=False)}


def _write_split(tmp_path, files: int, rows: int, driver_io_mb: float = 0.0) -> tuple[st.Storage, dict]:
    """``files`` Parquet files of ``rows`` rows (idx, label and a [2, 3] uint8 tensor column)."""
    from ray.data.extensions import ArrowTensorArray

    store = st.Storage(str(tmp_path), driver_io_mb=driver_io_mb)
    names = []
    for f in range(files):
        name = f"ingest/train/part-{f:03d}.parquet"
        os.makedirs(os.path.dirname(store.path(name)), exist_ok=True)
        idx = np.arange(f * rows, (f + 1) * rows, dtype=np.int64)
        image = ArrowTensorArray.from_numpy((idx[:, None, None] + np.arange(6).reshape(2, 3)).astype(np.uint8))
        pq.write_table(pa.table({"idx": idx, "label": (idx * 7) % 5, "image": image}), store.path(name))
        names.append(name)
    return store, {"stage": "ingest", "files": {"train": names}}


def test_footer_readers_count_follows_the_files_and_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.delenv(ingest.FOOTER_ACTORS_ENV, raising=False)
    for files, want in ((1, 1), (3, 1), (10, 1), (11, 2), (95, 10)):
        with ingest.footer_readers(files) as n:
            assert n == want and os.environ[ingest.FOOTER_ACTORS_ENV] == str(want)
        assert ingest.FOOTER_ACTORS_ENV not in os.environ
    monkeypatch.setenv(ingest.FOOTER_ACTORS_ENV, "5")  # the user's value wins and stays
    with ingest.footer_readers(3) as n:
        assert n == 5
    assert os.environ[ingest.FOOTER_ACTORS_ENV] == "5"


@pytest.mark.parametrize("files", [3, 12])
def test_read_split_starts_one_footer_reader_per_ten_files_and_keeps_file_order(ray_session, tmp_path, files):
    import ray.data

    if not getattr(ray.data.DataContext.get_current(), "use_datasource_v2", False):
        pytest.skip("this Ray reads Parquet without footer-reader actors (datasource V2 is off)")
    store, manifest = _write_split(tmp_path, files, rows=5)  # driver_io_mb=0: always streamed
    before = _footer_actor_ids()
    rows = ingest.read_split(store, manifest, "train").take_all()
    started = _footer_actor_ids() - before
    # Ray 2.60's default is 32 per dataset (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS)
    assert len(started) == -(-files // 10)
    assert [r["idx"] for r in rows] == list(range(files * 5))
    assert [r["label"] for r in rows] == [(i * 7) % 5 for i in range(files * 5)]


def test_a_small_split_is_read_by_the_driver_as_the_streamed_read_gives_it(ray_session, tmp_path):
    """Under ``driver_io_mb`` (the whole split's files): one in-memory block per file, no footer-reader
    actor, and every row, column and tensor value in the order the streamed read gives."""
    import ray.data

    streamed, manifest = _write_split(tmp_path, 3, rows=4)  # 3 files of 4 rows, a few kB
    small = st.Storage(str(tmp_path), driver_io_mb=1.0)
    before = _footer_actor_ids()
    ds = ingest.read_split(small, manifest, "train")
    assert ds.num_blocks() == 3 and ds.context.execution_options.preserve_order
    got = ds.take_all()
    assert _footer_actor_ids() == before
    want = ingest.read_split(streamed, manifest, "train").take_all()
    assert [r["idx"] for r in got] == [r["idx"] for r in want] == list(range(12))
    for a, b in zip(got, want, strict=True):
        assert a["label"] == b["label"] == (a["idx"] * 7) % 5
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["image"], a["idx"] + np.arange(6).reshape(2, 3))
    if getattr(ray.data.DataContext.get_current(), "use_datasource_v2", False):  # over the limit: streamed
        tiny = st.Storage(str(tmp_path), driver_io_mb=1e-4)  # 105 bytes, less than one file
        before = _footer_actor_ids()
        assert [r["idx"] for r in ingest.read_split(tiny, manifest, "train").take_all()] == list(range(12))
        assert len(_footer_actor_ids() - before) == 1


def test_fit_input_small_split_is_read_by_each_worker_its_equal_share_with_weights_by_idx(ray_session, tmp_path):
    """A split under both limits is handed to the training workers as files (no Ray Dataset); each worker
    reads it in idx order and keeps every world-th row from its rank on, rows // world of them; the round's
    weights are joined by idx. Over either limit it is a Ray Dataset with the same rows and weights."""
    import random

    streamed, manifest = _write_split(tmp_path, 3, rows=4)  # idx 0..11 in 3 files
    manifest["files"]["train"] = random.Random(0).sample(manifest["files"]["train"], 3)  # file order != idx
    small = st.Storage(str(tmp_path), driver_io_mb=1.0)
    weights = np.arange(12, dtype=np.float32)[::-1] / 4  # w[idx] = (11 - idx) / 4
    cols = ["idx", "image", "label"]
    spec = ingest.fit_input(small, manifest, "train", cols, 1 << 20, weights=weights)
    assert isinstance(spec, dict) and spec["manifest"]["files"]["train"] == manifest["files"]["train"]
    one = ingest.worker_rows(small, spec, 0, 1)
    assert list(one["idx"]) == list(range(12)) and list(one["label"]) == [(i * 7) % 5 for i in range(12)]
    assert list(one["w"]) == [(11 - i) / 4 for i in range(12)]
    np.testing.assert_array_equal(one["image"], np.arange(12)[:, None, None] + np.arange(6).reshape(2, 3))
    shares = [ingest.worker_rows(small, spec, r, 5) for r in range(5)]  # 12 // 5 = 2 rows each, 2 left over
    assert [list(s["idx"]) for s in shares] == [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]
    assert all(list(s["w"]) == [(11 - i) / 4 for i in s["idx"]] for s in shares)

    assert not isinstance(ingest.fit_input(small, manifest, "train", cols, 100), dict)  # over the worker's cache
    ds = ingest.fit_input(streamed, manifest, "train", cols, 1 << 20, weights=weights)  # over driver_io_mb
    rows = sorted(ds.take_all(), key=lambda r: r["idx"])
    assert [r["idx"] for r in rows] == list(range(12)) and [r["w"] for r in rows] == list(one["w"])


def test_a_record_that_does_not_decode_in_a_ray_task_fails_the_write_as_itself(ray_session, tmp_path):
    """Through Ray Data (a map_batches task, then its Parquet write): the UDF's error reaches the driver as Ray
    Data's UserCodeException, with the UDF's message in it, not as a failed write."""
    import ray.data
    from ray.exceptions import UserCodeException

    def decode(batch):
        if 3 in batch["idx"]:
            raise ValueError("bad input '/data/dog/3.png': unreadable image")
        return batch

    store = st.Storage(str(tmp_path))
    ds = ray.data.range(6, override_num_blocks=2).map(lambda r: {"idx": r["id"]}).map_batches(decode)
    with pytest.raises(UserCodeException, match=r"bad input '/data/dog/3\.png': unreadable image") as got:
        ingest.write_parquet(store, "ingest", "train", ds)
    assert not isinstance(got.value, OSError) and "was not written to" not in str(got.value)
