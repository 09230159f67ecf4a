"""Multi-label targets: one map per (image, class) pair, equal to the single-class call per class."""

import pytest
import torch

from xai_core.attribution import explain
from xai_core.attribution.reliable import learn_masks
from xai_core.metrics import pointing_game
from xai_core.models import SmallResNet, SmallViT
from xai_core.targets import PairMaps, Pairs, label_pairs

torch.set_num_threads(2)

def tiny_resnet():
    torch.manual_seed(0)
    return SmallResNet(num_classes=4, width=8).eval()


HOT = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 1]])


def test_label_pairs_from_multi_hot_and_from_class_lists():
    p = label_pairs(HOT, 4)
    assert p.image.tolist() == [0, 0, 2, 2, 2, 3]
    assert p.target.tolist() == [0, 2, 1, 2, 3, 3]
    assert p.rank.tolist() == [0, 1, 0, 1, 2, 0]
    assert p.num_classes == 4
    q = label_pairs([[3, 1], [], [0], [2, 0, 1]], 4)  # list order is kept within an image
    assert (q.image.tolist(), q.target.tolist(), q.rank.tolist()) == (
        [0, 0, 2, 3, 3, 3], [3, 1, 0, 2, 0, 1], [0, 1, 0, 0, 1, 2])
    assert label_pairs(HOT.bool(), 4).target.tolist() == p.target.tolist()
    assert label_pairs(HOT.float(), 4).image.tolist() == p.image.tolist()
    masks = torch.arange(4 * 4 * 2 * 2).view(4, 4, 2, 2)
    assert torch.equal(p.class_masks(masks)[4], masks[2, 3])
    assert torch.equal(p.rows(torch.arange(4) * 10), torch.tensor([0, 0, 20, 20, 20, 30]))


@pytest.mark.parametrize("target,match", [
    (torch.tensor([[1, 2], [0, 1]]), "holds only 0 and 1, got 2"),
    (torch.ones(3, 4), r"must have shape \[2,K\], got \(3, 4\)"),
    ([[0], [1], [2]], r"one list per image \(2\), got 3"),
    ([[0, 0], [1]], r"image 0 lists a class twice: \[0, 0\]"),
    ([[0], [-1]], "class -1 is out of range"),
])
def test_bad_multilabel_targets_raise(target, match):
    with pytest.raises(ValueError, match=match):
        label_pairs(target, 2)


def test_classes_out_of_range_and_width_mismatch_name_the_model_classes():
    model = tiny_resnet()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="target 7 is out of range: the model has 4 classes"):
        explain(model, x, [[0, 7], [1]], method="gradcam")
    with pytest.raises(ValueError, match="multi-hot target has 5 columns but the model has 4 classes"):
        explain(model, x, torch.zeros(2, 5).index_fill_(1, torch.tensor([0]), 1), method="gradcam")
    with pytest.raises(ValueError, match="for multi-label targets .* call explain"):
        learn_masks(model, x, HOT[:2], layers=["layer3"], steps=1)


METHODS = [("gradcam", {}), ("gradcam_pp", {}), ("layercam", {}), ("saliency", {}), ("input_x_gradient", {}),
           ("integrated_gradients", {"n_steps": 4}), ("tif", {}), ("tif", {"base": "gradient", "alpha": 0.5}),
           ("tif", {"base": "integrated_gradients", "n_steps": 4}), ("gradcam_thresholded", {}),
           ("haf", {"steps": 3, "lam": 0.01, "normalize": False})]


@pytest.mark.parametrize("method,opts", METHODS)
def test_multilabel_maps_equal_the_single_class_call_per_class(method, opts):
    model = tiny_resnet()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = explain(model, x, HOT, method=method, **opts)
    assert isinstance(res, PairMaps) and res.maps.shape == (6, 16, 16)
    for p in range(6):
        i, c = int(res.image[p]), int(res.target[p])
        one = explain(model, x[i:i + 1], torch.tensor([c]), method=method, **opts)
        torch.testing.assert_close(res.maps[p:p + 1], one, rtol=1e-5, atol=1e-6)
    assert float(res.maps.abs().amax()) > 0
    if method == "gradcam":  # raw maps too, and class lists give the same pairs
        raw = explain(model, x, [[0, 2], [], [1, 2, 3], [3]], method=method, upsample=False)
        ref = torch.cat([explain(model, x[i:i + 1], c, method=method, upsample=False)
                         for i, c in zip(res.image.tolist(), res.target.tolist())])
        torch.testing.assert_close(raw.maps, ref)


def test_a_vit_multilabel_call_equals_per_class_calls():
    torch.manual_seed(0)
    model = SmallViT(num_classes=4, num_registers=2).eval()
    x = torch.rand(4, 3, 64, 64)
    res = explain(model, x, HOT, method="layercam")
    ref = torch.cat([explain(model, x[i:i + 1], c, method="layercam")
                     for i, c in zip(res.image.tolist(), res.target.tolist())])
    torch.testing.assert_close(res.maps, ref, rtol=1e-5, atol=1e-6)


def test_one_forward_and_one_backward_per_label_rank():
    model = tiny_resnet()
    x = torch.rand(4, 3, 16, 16)
    calls = {"forward": 0, "backward": 0}
    h1 = model.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    h2 = model.layer3.register_full_backward_hook(
        lambda *_: calls.__setitem__("backward", calls["backward"] + 1))
    try:
        explain(model, x, HOT, method="gradcam", layers=["layer2"])
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"forward": 1, "backward": 3}  # image 2 has 3 classes: ranks 0, 1, 2


def test_multilabel_maps_with_create_graph_are_differentiable_like_per_class_calls():
    model = tiny_resnet()
    x = torch.rand(4, 3, 16, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    res = explain(model, x, HOT, method="gradcam", create_graph=True)
    ours = torch.autograd.grad(res.maps.pow(2).sum(), params, allow_unused=True)
    ref_maps = explain(model, res.pairs.rows(x), res.target, method="gradcam", create_graph=True)
    ref = torch.autograd.grad(ref_maps.pow(2).sum(), params, allow_unused=True)
    for o, r in zip(ours, ref):
        assert (o is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)


def test_metrics_take_per_pair_maps_and_class_masks():
    """A per-class pointing game: a hit when the map's maximum falls on that class's mask."""
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = maps[1, 3, 3] = maps[2, 0, 3] = 1  # pair maps peak at (0,0), (3,3), (0,3)
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[0, 1, :2, :2] = True   # image 0, class 1: top-left
    masks[0, 2, 2:, 2:] = True   # image 0, class 2: bottom-right
    masks[1, 0, 2:, :] = True    # image 1, class 0: bottom rows
    pairs = Pairs(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]), torch.tensor([0, 1, 0]), 2)
    hits = pointing_game(maps, pairs.class_masks(masks))
    assert hits.tolist() == [1.0, 1.0, 0.0]


def test_mean_average_precision_equals_sklearn():
    from sklearn.metrics import average_precision_score

    from xai_core.metrics import average_precision_per_class, mean_average_precision

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(40, 5, generator=g) < 0.4
    labels[:, 4] = False  # a class no image holds: no AP, left out of the mean
    scores = torch.randn(40, 5, generator=g).round(decimals=1)  # ties
    scores[labels] += 0.8
    ap = average_precision_per_class(scores, labels)
    for k in range(4):
        assert ap[k].item() == pytest.approx(average_precision_score(labels[:, k].numpy(), scores[:, k].numpy()))
    assert torch.isnan(ap[4])
    assert mean_average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels[:, :4].numpy(), scores[:, :4].numpy(), average="macro"))
    # by hand: scores 0.9 (pos), 0.8 (neg), 0.7 (pos) -> AP = (1/1 + 2/3) / 2
    one = average_precision_per_class(torch.tensor([[0.9], [0.8], [0.7]]), torch.tensor([[1], [0], [1]]))
    assert one.item() == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="multi-hot"):
        average_precision_per_class(scores, labels.long() * 2)


def test_multilabel_split_has_one_to_three_objects_each_with_its_own_mask():
    from xai_core.data.synthetic import BiasedShapes

    ds = BiasedShapes(n=300, seed=0, size=32, split="multilabel")
    counts = ds.label_sets.sum(1)
    assert set(counts.tolist()) == {1, 2, 3}
    # a class is in an image's label set exactly when its mask has pixels; masks never overlap (quadrants)
    assert torch.equal(ds.class_masks.flatten(2).any(2), ds.label_sets)
    assert int(ds.class_masks.sum(1).max()) == 1
    assert torch.equal(ds.masks, ds.class_masks[torch.arange(300), ds.labels])  # the first object's
    assert bool(ds.label_sets[torch.arange(300), ds.labels].all())  # labels: the first object's class
    item = ds[5]
    assert torch.equal(item["labels"], ds.label_sets[5]) and item["class_masks"].shape == (6, 32, 32)
    again = BiasedShapes(n=300, seed=0, size=32, split="multilabel")
    assert torch.equal(again.images, ds.images) and torch.equal(again.class_masks, ds.class_masks)
    with pytest.raises(ValueError, match=r"need 0 < low <= high <= 0.5 for split 'multilabel'"):
        BiasedShapes(n=4, split="multilabel", obj_scale=(0.3, 0.6))
