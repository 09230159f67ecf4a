"""ingest._validate, branch by branch: each bad split is named with its row or shape and what was expected; the
size of ingest's decode tasks."""

import re

import numpy as np
import pytest

from pipelines.ingest import _validate


def _split(n: int = 4, size: int = 8) -> dict[str, np.ndarray]:
    return {"image": np.zeros((n, 3, size, size), np.uint8), "label": np.arange(n) % 3,
            "mask": np.zeros((n, size, size), bool)}


def test_a_good_split_passes():
    _validate("train", _split(), num_classes=3)  # labels 0, 1, 2, 0


@pytest.mark.parametrize("breaker,message", [
    (lambda a: {k: v[:0] for k, v in a.items()}, "split 'train' is empty: nothing to train or evaluate on"),
    (lambda a: {**a, "label": np.array([0, 1, -1, 2])}, "split 'train' row 2: label -1 is outside 0..2"),
    (lambda a: {**a, "label": np.array([0, 3, 1, 7])}, "split 'train' row 1: label 3 is outside 0..2"),
    (lambda a: {**a, "image": a["image"].astype(np.float32)}, "split 'train': images must be uint8, got float32"),
    (lambda a: {**a, "mask": np.zeros((4, 8, 6), bool)}, "split 'train': masks (8, 6) do not match images (8, 8)"),
], ids=["empty", "negative-label", "label-above-classes", "float-images", "mask-size"])
def test_each_check_names_what_is_wrong(breaker, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _validate("train", breaker(_split()), num_classes=3)


def test_decode_tasks_are_whole_shards_within_the_byte_budget():
    from pipelines.ingest import DECODE_BLOCK_BYTES, DECODE_MAX_ROWS, decode_rows

    assert (DECODE_BLOCK_BYTES, DECODE_MAX_ROWS) == (64 * 2**20, 1024)
    assert decode_rows(64, 4, False, 2048) == 1024  # 16 KiB a row: the row cap
    assert decode_rows(64, 4, False, 100) == 100  # never more than a shard file holds
    assert decode_rows(224, 200, False, 2048) == 67108864 // (4 * 224 * 224) == 334  # 196 KiB a row
    # multi-label: + 20 class masks + seg, 25 bytes a pixel
    assert decode_rows(224, 20, True, 2048) == 67108864 // (25 * 224 * 224) == 53
    assert decode_rows(4096, 1000, True, 16) == 1  # one row per task at least


class _FailingWrite:
    """A dataset whose Parquet write raises ``error`` (the only method ingest.write_parquet calls)."""

    def __init__(self, error: Exception) -> None:
        self.error, self.calls = error, []

    def write_parquet(self, uri, **kw):
        self.calls.append((uri, kw))
        raise self.error


def test_a_failed_parquet_write_names_its_destination_and_data_errors_pass_unchanged(tmp_path):
    from pipelines import storage as st
    from pipelines.ingest import write_parquet

    store = st.Storage(str(tmp_path / "runs"))
    uri = store.uri("ingest", "test")
    lost = _FailingWrite(OSError("When testing for existence of bucket 'b': AWS Error NETWORK_CONNECTION"))
    with pytest.raises(OSError) as got:
        write_parquet(store, "ingest", "test", lost, max_rows_per_file=7)
    assert str(got.value) == (f"the test split of stage ingest was not written to {uri}: OSError: When testing "
                              "for existence of bucket 'b': AWS Error NETWORK_CONNECTION")
    assert got.value.__cause__ is lost.error and lost.calls == [(uri, {"filesystem": store.fs, "max_rows_per_file": 7})]
    other = _FailingWrite(RuntimeError("task lost"))  # not an OSError itself: named all the same
    with pytest.raises(OSError, match=re.escape(f"not written to {uri}: RuntimeError: task lost")):
        write_parquet(store, "ingest", "test", other)
    for error in (ValueError("bad input '/data/dog/3.png': unreadable image"),  # about the data: as raised
                  OSError(f"No space left on device: {tmp_path}/runs/ingest/test/part-0.parquet")):  # names it
        with pytest.raises(type(error)) as same:
            write_parquet(store, "ingest", "test", _FailingWrite(error))
        assert same.value is error
    from ray.exceptions import UserCodeException

    udf = UserCodeException("UDF failed to process a data block: ValueError: bad input '/data/dog/3.png'")
    with pytest.raises(UserCodeException) as same:  # a Ray Data UDF's error (decode): about the data, as raised
        write_parquet(store, "ingest", "test", _FailingWrite(udf))
    assert same.value is udf
