"""The evaluate stage's actor outside Ray: what a model's rows hold must not depend on its company."""

import numpy as np
import pytest
import torch

from pipelines import storage as st
from pipelines.common import make_model, state_bytes
from pipelines.config import ROOT, load_config
from pipelines.evaluate import EvalActor, draw_generator
from xai_core.data.synthetic import BiasedShapes


def _cfg(methods):
    return load_config(ROOT / "configs/smoke.yaml", [f"evaluate.methods=[{', '.join(methods)}]"])


def _setup(tmp_path, methods):
    cfg = _cfg(methods)
    store = st.Storage(str(tmp_path))
    paths = {}
    for seed, key in enumerate(["erm_s0", "scaat_s0"]):
        torch.manual_seed(seed)
        paths[key] = f"models/{key}.pt"
        store.write_bytes(state_bytes({"model": make_model(cfg).state_dict()}), "models", f"{key}.pt")
    arrays = BiasedShapes(n=6, seed=3, split="test", size=cfg.data.size,
                          num_classes=cfg.data.num_classes).arrays()
    batch = {"idx": np.arange(10, 16), **{k: arrays[k] for k in ("image", "label", "mask", "group")}}
    return cfg, store, paths, batch


def _rows(cfg, store, paths, batch, keys):
    actor = EvalActor(cfg.model_dump(mode="json"), store.args(), {k: paths[k] for k in keys},
                      {"tif": 0.5, "gradcam_thresholded": 0.5}, "test")
    out = actor(batch)
    return {(m, meth): {c: out[c][(out["model"] == m) & (out["method"] == meth)] for c in out}
            for m in keys for meth in set(out["method"])}


def test_drawn_columns_do_not_depend_on_the_other_models_or_methods(tmp_path):
    # The PGD start and the random deletion order used to come from one generator per batch, shared by
    # the models and methods in turn: evaluating scaat_s0 alone gave it other draws than after erm_s0.
    cfg, store, paths, batch = _setup(tmp_path, ["saliency", "gradcam"])
    both = _rows(cfg, store, paths, batch, ["erm_s0", "scaat_s0"])
    alone = _rows(cfg, store, paths, batch, ["scaat_s0"])
    one_method = _rows(_cfg(["gradcam"]), store, paths, batch, ["scaat_s0"])
    for cols in ("robust_acc_2", "robust_acc_8"):
        np.testing.assert_array_equal(both[("scaat_s0", "none")][cols], alone[("scaat_s0", "none")][cols])
    for ref in (alone, one_method):
        np.testing.assert_array_equal(both[("scaat_s0", "gradcam")]["deletion_auc_random"],
                                      ref[("scaat_s0", "gradcam")]["deletion_auc_random"])
    # ... and they are drawn: another batch (first sample) gets another order
    other = _rows(cfg, store, paths, {**batch, "idx": batch["idx"] + 100}, ["scaat_s0"])
    a = both[("scaat_s0", "gradcam")]["deletion_auc_random"]
    assert not np.array_equal(a, other[("scaat_s0", "gradcam")]["deletion_auc_random"])
    # the random-order curve does not depend on the map: one per model and batch, in every method's rows
    np.testing.assert_array_equal(a, both[("scaat_s0", "saliency")]["deletion_auc_random"])
    assert not np.array_equal(a, both[("scaat_s0", "saliency")]["deletion_auc"])


@pytest.mark.parametrize("args", [(0, "erm_s0", "pgd_2"), (10, "scaat_s0", "deletion_random")])
def test_draw_generator_is_a_pure_function_of_batch_model_and_purpose(args):
    first, key, purpose = args
    a = torch.rand(5, generator=draw_generator(*args))
    assert torch.equal(a, torch.rand(5, generator=draw_generator(*args)))
    for changed in [(first + 1, key, purpose), (first, key + "x", purpose), (first, key, purpose + "x")]:
        assert not torch.equal(a, torch.rand(5, generator=draw_generator(*changed)))


def test_variants_are_their_method_with_the_stated_options():
    """Each ablation/control row computes what its name says: the same maps as xai_core called with the
    options written out here by hand (TIF's layers are the model's default_layers: smoke sets no layers)."""
    from pipelines.evaluate import explain_fn
    from xai_core.attribution import explain

    cfg = _cfg(["tif"])
    torch.manual_seed(0)
    model = make_model(cfg).eval()
    x = torch.rand(3, 3, cfg.data.size, cfg.data.size)
    y = torch.tensor([0, 1, 2])
    layers = model.default_layers
    alphas = {"tif": 0.5, "gradcam_thresholded": 0.25}
    base = {"base": cfg.evaluate.tif_base}
    want = {
        "tif_fusion_only": ("tif", {**base, "alpha": 0.0}),
        "tif_one_layer": ("tif", {**base, "alpha": 0.5, "layers": layers[-1:]}),
        "tif_uniform": ("tif", {**base, "alpha": 0.5, "weights": "uniform"}),
        "tif_base_fused": ("tif", {**base, "alpha": 0.0, "weights": "uniform"}),
        "gradcam_fused": ("gradcam", {"layers": layers}),
        "haf_one_sided": ("haf", {"steps": cfg.evaluate.haf_steps, "preserve": "one_sided"}),
    }
    for name, (method, opts) in want.items():
        got = explain_fn(cfg, name, alphas)(model, x, y)
        torch.testing.assert_close(got, explain(model, x, y, method=method, **opts), msg=name)
    # the variants differ from the method itself (the check could not pass with the options ignored)
    tif = explain(model, x, y, method="tif", **base, alpha=0.5)
    for name in ("tif_fusion_only", "tif_one_layer", "tif_uniform"):
        assert not torch.allclose(explain_fn(cfg, name, alphas)(model, x, y), tif), name
    # D-WSOL's raw maps: the same methods without per-map / per-layer normalisation
    raw = explain_fn(cfg, "gradcam_fused", {}, raw=True)(model, x, y)
    torch.testing.assert_close(raw, explain(model, x, y, method="gradcam", layers=layers, normalize=False))
    assert not torch.allclose(raw, explain(model, x, y, method="gradcam", layers=layers))


def test_absent_class_is_drawn_among_classes_neither_object_nor_background():
    from pipelines.evaluate import draw_absent

    idx = np.arange(200)
    a, b, bg = idx % 6, (idx + 1) % 6, (idx + 3) % 6
    c = draw_absent(idx, a, b, bg, 6)
    assert not np.any((c == a) | (c == b) | (c == bg))
    assert set(c.tolist()) == {0, 1, 2, 3, 4, 5}  # drawn, not one fixed choice
    assert np.array_equal(c, draw_absent(idx, a, b, bg, 6))  # seeded by the image
    assert np.array_equal(draw_absent(idx[5:9], a[5:9], b[5:9], bg[5:9], 6), c[5:9])  # whatever the batch
    # three classes: only one is not an object, background or not
    three = draw_absent(np.arange(3), np.array([0, 1, 2]), np.array([1, 2, 0]), np.array([2, 0, 1]), 3)
    assert three.tolist() == [2, 0, 1]


def test_a_restarted_evaluate_keeps_only_the_shards_committed_under_its_config(tmp_path):
    """What a rerun of a killed evaluate starts from: the split shards committed under the same config hash;
    a shard of another config, one without a manifest (the killed one) and everything else of the stage go;
    --force removes every shard."""
    from pipelines import storage as st
    from pipelines.evaluate import STAGE, _begin_keeping_shards

    store = st.Storage(str(tmp_path))

    def shard(split: str, lo: int, h: str | None) -> None:
        stage = f"{STAGE}/{split}/{lo:06d}"
        st.begin(store, stage)
        store.write_bytes(b"rows", stage, "part.parquet")
        if h:
            st.commit(store, stage, h, files=[f"{stage}/part.parquet"], rows=1)

    shard("test", 0, "h1")
    shard("test", 16, "h0")  # committed under another config
    shard("test", 32, None)  # the shard that was being written when the run died
    shard("dwsol", 0, "h1")
    store.write_json({}, STAGE, "summary.json")
    store.write_bytes(b"w", STAGE, "models", "random_s0.pt")
    st.commit(store, STAGE, "h0", files={})

    def left() -> list[str]:
        root = tmp_path / STAGE
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    _begin_keeping_shards(store, "h1", force=False)
    assert left() == ["dwsol/000000/_manifest.json", "dwsol/000000/part.parquet",
                      "test/000000/_manifest.json", "test/000000/part.parquet"]
    _begin_keeping_shards(store, "h1", force=True)
    assert left() == [] and (tmp_path / STAGE).is_dir()


def test_wsol_box_levels_are_the_maps_box_iou_levels(tmp_path):
    """evaluate.wsol_boxes: each method row holds box_iou_levels of that method's map and the image's box
    (recomputed here with explain and xai_core.metrics); an image without a box gets a NaN row."""
    from pipelines.evaluate import explain_fn
    from xai_core.metrics import box_iou_levels

    cfg, store, paths, batch = _setup(tmp_path, ["gradcam"])
    cfg = load_config(ROOT / "configs/smoke.yaml", ["evaluate.methods=[gradcam]", "evaluate.wsol_boxes=true"])
    arrays = BiasedShapes(n=6, seed=3, split="test", size=cfg.data.size, num_classes=cfg.data.num_classes).arrays()
    box = arrays["box"].copy()
    box[5] = -1  # no box
    rows = _rows(cfg, store, paths, {**batch, "box": box}, ["erm_s0"])[("erm_s0", "gradcam")]
    model = make_model(cfg, pretrained=False)
    model.load_state_dict(torch.load(tmp_path / paths["erm_s0"], weights_only=True)["model"])
    x = torch.from_numpy(batch["image"]).float() / 255
    maps = explain_fn(cfg, "gradcam", {})(model.eval(), x, torch.from_numpy(batch["label"]))
    want = box_iou_levels(maps[:5], torch.from_numpy(box[:5])).float().numpy()
    np.testing.assert_allclose(rows["box_iou_levels"][:5], want, atol=1e-6)
    assert np.isnan(rows["box_iou_levels"][5]).all()


def test_multilabel_pair_rows_hold_the_strict_pointing_game_and_difficult_flags(tmp_path):
    sets = ["evaluate.methods=[gradcam]", "data.multilabel=true", "train.loss=bce", "train.modes=[erm]",
            "sweep.model=erm"]
    cfg = load_config(ROOT / "configs/smoke.yaml", sets)
    store = st.Storage(str(tmp_path))
    torch.manual_seed(0)
    store.write_bytes(state_bytes({"model": make_model(cfg).state_dict()}), "models", "erm_s0.pt")
    a = BiasedShapes(n=5, seed=1, split="multilabel", size=cfg.data.size, num_classes=cfg.data.num_classes).arrays()
    difficult = np.zeros_like(a["labels"])
    difficult[0, np.flatnonzero(a["labels"][0])[0]] = True  # image 0's first class: all its objects difficult
    subset = a["labels"].copy()
    subset[1] = False  # TorchRay's difficult subset: every pair but image 1's
    batch = {"idx": np.arange(5), "difficult": difficult, "subset": subset,
             **{k: a[k] for k in ("image", "label", "mask", "group", "labels", "class_masks")}}
    rows = _rows(cfg, store, {"erm_s0": "models/erm_s0.pt"}, batch, ["erm_s0"])[("erm_s0", "gradcam")]
    n_pairs = int(a["labels"].sum())
    assert len(rows["idx"]) == n_pairs and rows["difficult"].sum() == 1
    np.testing.assert_array_equal(rows["difficult_subset"], (rows["idx"] != 1).astype(float))
    assert rows["difficult"][(rows["idx"] == 0) & (rows["label"] == np.flatnonzero(a["labels"][0])[0])] == 1
    assert set(np.unique(rows["pointing_game_strict"])) <= {0.0, 1.0}
    assert (rows["pointing_game_strict"] <= rows["pointing_game"]).all()  # strict can only lose hits


def test_a_mode_evaluated_with_fewer_methods_has_the_same_rows_for_them(tmp_path):
    """evaluate.mode_methods: scaat_s0 gets only saliency rows, with the values it has when every method runs
    (the random-order curve and PGD draws are per model and purpose, not per method list)."""
    cfg, store, paths, batch = _setup(tmp_path, ["saliency", "gradcam"])
    full = _rows(cfg, store, paths, batch, ["erm_s0", "scaat_s0"])
    few = load_config(ROOT / "configs/smoke.yaml", ["evaluate.methods=[saliency, gradcam]",
                                                    "evaluate.mode_methods={scaat: [saliency]}"])
    part = _rows(few, store, paths, batch, ["erm_s0", "scaat_s0"])
    assert set(part) == {(m, meth) for m in ("erm_s0", "scaat_s0") for meth in ("none", "saliency")} | \
        {("erm_s0", "gradcam"), ("scaat_s0", "gradcam")}  # the dict lists every (model, method) pair ...
    assert len(part[("scaat_s0", "gradcam")]["idx"]) == 0 and len(part[("erm_s0", "gradcam")]["idx"]) == 6
    for col in ("gini", "deletion_auc", "deletion_auc_random", "pxap"):  # ... but scaat has no gradcam rows
        np.testing.assert_array_equal(part[("scaat_s0", "saliency")][col], full[("scaat_s0", "saliency")][col])


def test_dataset_checks_commit_per_model_and_only_for_the_check_modes(tmp_path):
    import json

    from pipelines.evaluate import CHECKS, STAGE, dataset_checks

    cfg = load_config(ROOT / "configs/smoke.yaml", ["evaluate.methods=[saliency, gradcam]",
                                                    "evaluate.check_modes=[erm]", "evaluate.detection_images=0",
                                                    "evaluate.randomisation_images=4"])
    store = st.Storage(str(tmp_path))
    paths = {}
    for seed, key in enumerate(["erm_s0", "scaat_s0", "erm_s1"]):
        torch.manual_seed(seed)
        paths[key] = f"models/{key}.pt"
        store.write_bytes(state_bytes({"model": make_model(cfg).state_dict()}), "models", f"{key}.pt")
    arrays = BiasedShapes(n=4, seed=3, split="test", size=cfg.data.size, num_classes=cfg.data.num_classes).arrays()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray  # the tensor column type ingest writes

    store.mkdir("ingest", "test")
    pq.write_table(pa.table({"idx": np.arange(4), "image": ArrowTensorArray.from_numpy(arrays["image"]),
                             "label": arrays["label"]}), store.path("ingest", "test", "part.parquet"))
    manifest = {"stage": "ingest", "files": {"test": ["ingest/test/part.parquet"]}}
    first = dataset_checks(cfg, store, manifest, paths, {}, h="h1")
    assert sorted(first) == ["erm_s0", "erm_s1"]  # scaat_s0 is not in check_modes
    assert sorted(p.name for p in (tmp_path / STAGE / CHECKS).iterdir()) == ["erm_s0", "erm_s1"]
    layers = ("bn1", "conv1", "fc", "layer1", "layer2", "layer3")
    assert {k for k in first["erm_s0"]} == {f"randomisation_{m}_{w}" for m in ("gradcam", "saliency")
                                            for w in [*layers, *(f"{v}_constant" for v in [*layers, "trained"])]}
    # the constant-map shares are model_randomisation's own, on the same images
    from pipelines.common import load_model, to_tensors
    from pipelines.evaluate import explain_fn
    from xai_core.metrics import model_randomisation

    x = to_tensors({"image": arrays["image"]})["image"]
    constant: dict = {}
    model = load_model(cfg, store.read_bytes(paths["erm_s0"]), "erm_s0")
    rho = model_randomisation(model, x, torch.from_numpy(arrays["label"]).long(), explain_fn(cfg, "gradcam", {}),
                              constant=constant)
    for w in layers:
        assert first["erm_s0"][f"randomisation_gradcam_{w}_constant"] == pytest.approx(constant[w].float().mean())
        assert first["erm_s0"][f"randomisation_gradcam_{w}"] == pytest.approx(torch.nanmean(rho[w]).item(),
                                                                              nan_ok=True)
    assert first["erm_s0"]["randomisation_gradcam_trained_constant"] == constant["trained"].float().mean()
    # a rerun (a killed evaluate) takes the committed result instead of recomputing it
    unit = tmp_path / STAGE / CHECKS / "erm_s1" / st.MANIFEST
    m = json.loads(unit.read_text())
    m["result"] = {"randomisation_gradcam_fc": 0.5}
    unit.write_text(json.dumps(m))
    again = dataset_checks(cfg, store, manifest, paths, {}, h="h1")
    assert again["erm_s1"] == {"randomisation_gradcam_fc": 0.5} and again["erm_s0"] == first["erm_s0"]
    assert dataset_checks(cfg, store, manifest, paths, {}, h="h2")["erm_s1"] == first["erm_s1"]  # another key


def test_wsss_scores_choose_the_threshold_on_val_and_match_sklearn_on_test(tmp_path):
    """evaluate.wsss_scores against an independent path: the same maps, pseudo-labels at the threshold of the
    best validation mIoU (by hand over the grid), then sklearn's per-label Jaccard on the test pixels."""
    from sklearn.metrics import jaccard_score

    from pipelines.evaluate import explain_fn, wsss_scores
    from xai_core.metrics.segmentation import wsss_labels
    from xai_core.targets import label_pairs

    cfg = load_config(ROOT / "configs/smoke.yaml", ["evaluate.methods=[gradcam]", "data.multilabel=true",
                                                    "train.loss=bce", "train.modes=[erm]", "sweep.model=erm",
                                                    "evaluate.wsss_images=6",
                                                    "evaluate.wsss_thresholds=[0.2, 0.5, 0.8]"])
    torch.manual_seed(0)
    model = make_model(cfg).eval()
    k = cfg.data.num_classes
    data = {}
    for split, seed in (("val", 1), ("test", 2)):
        a = BiasedShapes(n=6, seed=seed, split="multilabel", size=cfg.data.size, num_classes=k).arrays()
        cm = a["class_masks"]
        seg = np.zeros((cm.shape[0], *cm.shape[2:]), np.int64)
        for c in range(k):  # label = class + 1 where the class's mask is, 255 on one border row
            seg[cm[:, c]] = c + 1
        seg[:, 0] = 255
        data[split] = {"image": torch.from_numpy(a["image"]).float() / 255, "labels": torch.from_numpy(a["labels"]),
                       "seg": torch.from_numpy(seg)}
    res = wsss_scores(cfg, model, data, ["gradcam"], {})

    def labels_at(split, thr):
        d = data[split]
        pairs = label_pairs(d["labels"], len(d["seg"]))
        maps = explain_fn(cfg, "gradcam", {})(model, d["image"], pairs).detach()
        return wsss_labels(maps, pairs.image, pairs.target, len(d["seg"]), [thr])[0]

    def miou_sklearn(split, thr):
        gt, pred = data[split]["seg"].flatten().numpy(), labels_at(split, thr).flatten().numpy()
        keep = gt != 255
        present = sorted(set(gt[keep]) | set(pred[keep]))
        return float(np.mean(jaccard_score(gt[keep], pred[keep], labels=present, average=None)))

    val = [miou_sklearn("val", t) for t in (0.2, 0.5, 0.8)]
    assert len(set(val)) == 3  # the grid matters here
    best = (0.2, 0.5, 0.8)[int(np.argmax(val))]
    assert res["wsss_bg_threshold_gradcam"] == best
    assert res["wsss_val_miou_gradcam"] == pytest.approx(max(val))
    assert res["wsss_miou_gradcam"] == pytest.approx(miou_sklearn("test", best))
    assert res["wsss_miou_low_gradcam"] <= res["wsss_miou_gradcam"] <= res["wsss_miou_high_gradcam"]
    assert (res["wsss_images_val"], res["wsss_images_test"]) == (6.0, 6.0)
