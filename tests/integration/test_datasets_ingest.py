"""Ingest of CUB, Waterbirds and VOC (fixtures in their on-disk layouts) through the pipeline's ingest stage:
decoded in Ray Data tasks, every stored row equal to the reader's record decoded directly."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests._datasets import write_cub, write_voc, write_waterbirds

pytestmark = pytest.mark.slow

SOURCES = {"cub": (lambda p: write_cub(p, n=70), []), "waterbirds": (write_waterbirds, []),
}  # voc: the whole-pipeline test below checks its rows


def _run(source: str, root, tmp_path, extra: list[str], stages: list[str]) -> tuple:
    from pipelines import full
    from pipelines import storage as st
    from pipelines.config import ROOT, load_config

    sets = [f"data.source={source}", f"data.root={root}", "data.size=24", "data.rows_per_shard=16", "data.n_dwsol=0",
            f"storage.uri={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    args = ["--config", str(ROOT / "configs/smoke.yaml"), *stages]
    for s in sets:
        args += ["--set", s]
    assert full.main(args) == 0
    cfg = load_config(ROOT / "configs/smoke.yaml", sets)
    return args, cfg, st.from_config(cfg)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_ingest_rows_equal_the_records_decoded_directly(source, ray_session, tmp_path, capsys):
    from pipelines import full

    write, extra = SOURCES[source]
    root = write(tmp_path / "data")
    args, cfg, store = _run(source, root, tmp_path, extra, ["--only", "ingest"])
    _check_rows(source, root, cfg, store)
    assert full.main(args) == 0 and "Nothing to do" in capsys.readouterr().out


def test_voc_fixture_runs_the_whole_pipeline_with_the_difficult_subset_and_wsss(ray_session, tmp_path):
    """VOC as distributed (every image segmented, TorchRay's flags file) through every stage: the ingest rows
    equal the reader's records, the pair rows carry the difficult-subset flag, the report gets the pointing
    game's difficult column and the WSSS table (threshold chosen on validation)."""
    from tests._datasets import write_difficult_subset
    from tests.integration.test_pipeline import _evaluate_rows
    from xai_core.data.datasets import VOC_CLASSES

    root = write_voc(tmp_path / "data", segment_all=True)
    flags = write_difficult_subset(tmp_path / "difficult.txt", {"2008_000005": [VOC_CLASSES.index("bird")],
                                                                "2008_000006": []})
    extra = ["data.multilabel=true", "train.loss=bce", "train.modes=[erm]", f"data.difficult_subset={flags}",
             "data.val_fraction=0.25", "evaluate.methods=[gradcam, saliency]", "evaluate.n_dwsol=0",
             "evaluate.random_baseline=false", "evaluate.detection_images=0", "evaluate.randomisation_images=0",
             "evaluate.wsss_images=4", "evaluate.wsss_thresholds=[0.3, 0.6]", "sweep.enabled=false"]
    _args, cfg, store = _run("voc", root, tmp_path, extra, [])
    _check_rows("voc", root, cfg, store)
    df = _evaluate_rows(Path(store.path()))
    rows = df[(df.model == "erm_s0") & (df.method == "gradcam")]
    bird = VOC_CLASSES.index("bird")
    assert sorted(rows[rows.difficult_subset > 0.5].label.tolist()) == [bird]  # 000005's bird; 000006: none
    summary = json.loads(store.read_bytes("evaluate", "summary.json"))["erm_s0"]
    assert summary["wsss_bg_threshold_gradcam"] in (0.3, 0.6)
    assert (summary["wsss_images_val"], summary["wsss_images_test"]) == (1.0, 2.0)
    results = store.read_bytes("report", "RESULTS.md").decode()
    assert "## WSSS: pseudo-mask mIoU" in results
    assert f"| erm_s0 | gradcam | {summary['wsss_bg_threshold_gradcam']:.2f} |" in results
    html = store.read_bytes("report", "report.html").decode()
    assert "difficult_mean_over_classes" in html


def _check_rows(source, root, cfg, store) -> None:
    from pipelines import ingest
    from pipelines import storage as st
    from xai_core.data.datasets import READERS, load_record

    manifest = st.committed(store, ingest.STAGE, ingest.config_hash(cfg))
    kw = {} if source == "waterbirds" else {"val_fraction": cfg.data.val_fraction, "seed": cfg.data.seed}
    if source == "voc":
        kw["difficult_subset"] = cfg.data.difficult_subset
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
