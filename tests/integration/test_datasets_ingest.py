"""Ingest of CUB, Waterbirds and VOC (fixtures in their on-disk layouts) through the pipeline's ingest stage:
decoded in Ray Data tasks, every stored row equal to the reader's record decoded directly."""

import numpy as np
import pytest

from tests._datasets import write_cub, write_voc, write_waterbirds

pytestmark = pytest.mark.slow

SOURCES = {"cub": (lambda p: write_cub(p, n=70), []), "waterbirds": (write_waterbirds, []),
           "voc": (write_voc, ["data.multilabel=true", "train.loss=bce", "train.modes=[erm]"])}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_ingest_rows_equal_the_records_decoded_directly(source, ray_session, tmp_path, capsys):
    from pipelines import full, ingest
    from pipelines import storage as st
    from pipelines.config import ROOT, load_config
    from xai_core.data.datasets import READERS, load_record

    write, extra = SOURCES[source]
    root = write(tmp_path / "data")
    sets = [f"data.source={source}", f"data.root={root}", "data.size=24", "data.rows_per_shard=16", "data.n_dwsol=0",
            f"storage.uri={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    args = ["--config", str(ROOT / "configs/smoke.yaml"), "--only", "ingest"]
    for s in sets:
        args += ["--set", s]
    assert full.main(args) == 0
    cfg = load_config(ROOT / "configs/smoke.yaml", sets)
    store = st.from_config(cfg)
    manifest = st.committed(store, ingest.STAGE, ingest.config_hash(cfg))
    kw = {} if source == "waterbirds" else {"val_fraction": cfg.data.val_fraction, "seed": cfg.data.seed}
    listing = READERS[source](root, **kw)
    assert manifest["rows"] == {s: len(listing.records[s]) for s in ("train", "val", "test")}
    for split, recs in listing.records.items():
        if len(recs) > 16:  # at most rows_per_shard rows per Parquet file: several files, in idx order
            assert len(manifest["files"][split]) > 1
        got = ingest.read_split_numpy(store, manifest, split)
        assert got["idx"].tolist() == list(range(len(recs)))
        for i, rec in enumerate(recs):
            want = load_record(rec, 24, cfg.data.num_classes, cfg.data.multilabel)
            for k, v in want.items():
                np.testing.assert_array_equal(got[k][i], v, err_msg=f"{split} row {i} column {k}")
    assert full.main(args) == 0 and "Nothing to do" in capsys.readouterr().out
