"""The smoke pipeline with a vision transformer (model.arch=vit_tiny): ERM, consistency reweighting (CAM
masks on the token grid) and SCAAT train it, the sweep and evaluate explain it, rows equal xai_core calls."""

import json

import numpy as np
import pytest
import torch

from tests.integration.conftest import _smoke
from tests.integration.test_pipeline import _evaluate_rows, _split

pytestmark = pytest.mark.slow

# Every training mode on the ViT; the stages after it at their smallest (the sweep, HAF on token grids and the
# dataset checks are covered by the unit tests and by the CNN smoke run): a whole run costs suite time.
VIT = ["--set", "model.arch=vit_tiny", "--set", "evaluate.methods=[gradcam, layercam, tif]",
       "--set", "sweep.enabled=false", "--set", "evaluate.n_test=8", "--set", "evaluate.n_dwsol=4",
       "--set", "evaluate.random_baseline=false", "--set", "evaluate.detection_images=0",
       "--set", "evaluate.randomisation_images=0"]


def test_vit_tiny_runs_every_stage_and_its_rows_equal_xai_core(ray_session, tmp_path):
    from pipelines import full
    from pipelines.config import ROOT, load_config
    from xai_core.attribution import explain
    from xai_core.metrics import pointing_game, pxap
    from xai_core.models import SmallViT

    run = _smoke(tmp_path)
    assert full.main(run["args"] + VIT) == 0
    store = run["store"]
    cfg = load_config(ROOT / "configs/smoke.yaml", [a for a in VIT if a != "--set"])
    train = {k: json.loads((store / "train" / k / "_manifest.json").read_text()) for k in
             ("erm_s0", "consistency_s0", "scaat_s0")}
    assert {m["mode"] for m in train.values()} == {"erm", "consistency", "scaat"}
    df = _evaluate_rows(store)
    assert set(df.method.unique()) == {"none", "gradcam", "layercam", "tif"}
    assert set(df.model.unique()) == set(train)
    data = _split(store, "test")
    x = torch.from_numpy(data["image"][:4].astype(np.float32) / 255)
    y = torch.from_numpy(data["label"][:4].copy()).long()
    mask = torch.from_numpy(data["mask"][:4].copy()).bool()
    idx = data["idx"][:4]
    for key in train:
        model = SmallViT(num_classes=cfg.data.num_classes, image_size=cfg.data.size)
        model.load_state_dict(torch.load(store / "train" / key / "model.pt", weights_only=True)["model"])
        model.eval()
        for method in ("gradcam", "layercam"):
            maps = explain(model, x, y, method=method).detach()
            rows = df[(df.model == key) & (df.method == method)].set_index("idx").loc[idx]
            np.testing.assert_allclose(rows.pxap.to_numpy(), pxap(maps, mask).numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(rows.pointing_game.to_numpy(), pointing_game(maps, mask).numpy())
    assert float(df[df.method == "tif"].gini.mean()) > 0  # token-grid maps are not empty
