"""The smoke pipeline with a vision transformer (model.arch=vit_tiny) on multi-label data (data.multilabel,
train.loss bce): trained with one sigmoid per class, explained per (image, class) pair on its token grid
against that class's mask, mAP in the report and RESULTS.md. One run for both (a whole run costs suite time);
consistency and SCAAT training a ViT are unit tests (tests/unit/test_tokens.py)."""

import json

import numpy as np
import pytest
import torch

from tests.integration.conftest import _smoke
from tests.integration.test_pipeline import _evaluate_rows, _split

pytestmark = pytest.mark.slow

ML = ["--set", "model.arch=vit_tiny", "--set", "data.multilabel=true", "--set", "train.loss=bce",
      "--set", "train.modes=[erm]",
      "--set", "evaluate.methods=[gradcam, saliency]", "--set", "evaluate.n_test=12", "--set", "sweep.enabled=false",
      "--set", "evaluate.n_dwsol=4", "--set", "evaluate.random_baseline=false",
      "--set", "evaluate.detection_images=0", "--set", "evaluate.randomisation_images=0"]


def test_vit_multilabel_run_explains_every_image_class_pair_and_reports_map(ray_session, tmp_path):
    from sklearn.metrics import average_precision_score

    from pipelines import full
    from pipelines.common import make_model
    from pipelines.config import ROOT, load_config
    from xai_core.attribution import explain
    from xai_core.metrics import pointing_game, pxap

    run = _smoke(tmp_path)
    assert full.main(run["args"] + ML) == 0
    store = run["store"]
    cfg = load_config(ROOT / "configs/smoke.yaml", [a for a in ML if a != "--set"])
    data = _split(store, "test")
    assert data["labels"].shape == (32, 6) and data["class_masks"].shape == (32, 6, 32, 32)
    df = _evaluate_rows(store)
    n = cfg.evaluate.n_test
    first = data["idx"][:n]
    counts = data["labels"][:n].sum(1)
    assert set(counts.tolist()) >= {1, 2}
    for method in cfg.evaluate.methods:  # one row per (image, class) pair, the class explained as "label"
        rows = df[(df.model == "erm_s0") & (df.method == method)]
        assert len(rows) == int(counts.sum())
        got = sorted(zip(rows.idx.tolist(), rows.label.tolist()))
        want = sorted((int(i), int(c)) for i, hot in zip(first, data["labels"][:n]) for c in np.flatnonzero(hot))
        assert got == want
    model = make_model(cfg)
    assert type(model).__name__ == "SmallViT"
    model.load_state_dict(torch.load(store / "train" / "erm_s0" / "model.pt", weights_only=True)["model"])
    model.eval()
    x = torch.from_numpy(data["image"][:n].astype(np.float32) / 255)
    hot = torch.from_numpy(data["labels"][:n].copy())
    res = explain(model, x, hot, method="gradcam")
    masks = res.pairs.class_masks(torch.from_numpy(data["class_masks"][:n].copy()))
    rows = df[(df.model == "erm_s0") & (df.method == "gradcam")].set_index(["idx", "label"])
    keys = list(zip(first[res.image.numpy()].tolist(), res.target.tolist()))
    np.testing.assert_allclose(rows.loc[keys].pointing_game.to_numpy(), pointing_game(res.maps, masks).numpy())
    np.testing.assert_allclose(rows.loc[keys].pxap.to_numpy(), pxap(res.maps, masks).numpy(), rtol=1e-5, atol=1e-6)
    # the accuracy rows carry the logits of every test image: mAP as sklearn computes it
    acc = df[(df.model == "erm_s0") & (df.method == "none")].sort_values("idx")
    with torch.no_grad():
        logits = model(torch.from_numpy(data["image"].astype(np.float32) / 255)).numpy()
    np.testing.assert_allclose(acc[[f"score_{k}" for k in range(6)]].to_numpy(), logits, rtol=1e-4, atol=1e-5)
    labels = data["labels"].astype(int)
    present = labels.sum(0) > 0
    ref = average_precision_score(labels[:, present], logits[:, present], average="macro")
    text = (store / "report" / "RESULTS.md").read_text()
    assert "## Multi-label data: mAP and the per-class pointing game" in text
    assert f"| erm_s0 | {ref:.3f} |" in text
    manifest = json.loads((store / "train" / "erm_s0" / "_manifest.json").read_text())
    assert "val_map" in json.dumps(manifest)  # the validation mAP of the kept checkpoints
