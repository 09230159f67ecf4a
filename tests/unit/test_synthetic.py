"""BiasedShapes (METHODS §7): determinism, masks, boxes, realised bias, balanced splits, D-WSOL, errors."""

import math

import numpy as np
import pytest
import torch

from xai_core.data.schema import RECORD_FIELDS, from_arrow_table, to_arrow_table
from xai_core.data.synthetic import SHAPES, BiasedShapes, _shape_mask


@pytest.fixture(scope="module")
def small():
    return BiasedShapes(n=240, seed=3)


def test_same_arguments_same_bytes(small):
    again = BiasedShapes(n=240, seed=3)
    for key, a in small.arrays().items():
        assert np.array_equal(a, again.arrays()[key]), key
    assert small.images.dtype == torch.uint8


def test_seed_and_split_change_the_images(small):
    other_seed = BiasedShapes(n=240, seed=4)
    other_split = BiasedShapes(n=240, seed=3, split="test", bias=0.9)  # same knobs, only the split differs
    for other in (other_seed, other_split):
        differs = (other.images != small.images).flatten(1).any(1)
        assert differs.all()


def test_item_fields(small):
    item = small[5]
    assert set(item) == {"image", "label", "mask", "box", "background", "group"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].dtype == torch.bool and item["mask"].shape == (64, 64)
    assert item["group"] == int(item["background"] != item["label"])
    assert torch.equal(item["image"], small.images[5].float() / 255)
    with pytest.raises(IndexError):
        small[240]


def test_masks_cover_exactly_the_object(small):
    """Inside the mask every pixel has one colour (the opaque object); the box is the mask's bounding box."""
    for i in range(len(small)):
        item = small[i]
        img, mask = small.images[i], item["mask"]
        assert mask.sum() > 20
        inside = img[:, mask]
        assert (inside == inside[:, :1]).all(), i  # one colour inside
        # the ring outside the mask (pixels touching it) differs from the object colour
        touching = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool() & ~mask
        border = img[:, touching]
        assert ((border - inside[:, :1]).abs().amax(0) > 0).all(), i
        ys, xs = mask.nonzero(as_tuple=True)
        assert item["box"] == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)


def test_shapes_are_distinct_and_sized():
    """Each shape in the unit disc has its expected area fraction (hand-computed) on a fine grid."""
    r = (torch.arange(400, dtype=torch.float32) + 0.5) / 200 - 1
    v, u = torch.meshgrid(r, r, indexing="ij")
    area = {k: _shape_mask(k, u, v).float().mean().item() * 4 for k in range(len(SHAPES))}
    expected = {0: math.pi, 1: 2.0, 2: 3 * math.sqrt(3) / 4, 3: 2 * 0.6 * 1.8 - 0.36,
                4: 5 * 0.4 * math.sin(math.pi / 5) * 1.0, 5: math.pi * (1 - 0.25)}
    for k, a in expected.items():
        assert area[k] == pytest.approx(a, rel=0.02), SHAPES[k]


def test_objects_stay_inside_and_scale_follows_the_knob():
    ds = BiasedShapes(n=120, seed=1, obj_scale=(0.3, 0.3))
    circles = ds.labels == 0
    widths = (ds.boxes[circles, 2] - ds.boxes[circles, 0]).float()
    assert widths.min() >= 0.3 * 64 - 2 and widths.max() <= 0.3 * 64 + 1
    assert (ds.boxes[:, :2] >= 0).all() and (ds.boxes[:, 2:] <= 64).all()


def test_realised_bias_matches_the_knob():
    for bias in (0.9, 0.5):
        ds = BiasedShapes(n=5000, seed=0, size=16, bias=bias)
        aligned = (ds.groups == 0).float().mean().item()
        sigma = math.sqrt(bias * (1 - bias) / 5000)
        assert abs(aligned - bias) < 4 * sigma, (bias, aligned)
        assert torch.equal(ds.groups == 0, ds.backgrounds == ds.labels)
        counts = torch.bincount(ds.labels, minlength=6)
        assert counts.max() - counts.min() <= 1  # classes balanced


def test_test_split_is_balanced():
    ds = BiasedShapes(n=3000, seed=0, size=16, split="test")
    assert ds.bias == pytest.approx(1 / 6)
    joint = torch.bincount(ds.labels * 6 + ds.backgrounds, minlength=36).float() / 3000
    # every (class, background) pair near 1/36 (binomial 4-sigma)
    sigma = math.sqrt((1 / 36) * (35 / 36) / 3000)
    assert (joint - 1 / 36).abs().max() < 4 * sigma
    assert BiasedShapes(n=10, split="test", bias=0.9).bias == 0.9  # explicit override


def test_dwsol_two_disjoint_objects():
    ds = BiasedShapes(n=200, seed=2, split="dwsol")
    item = ds[0]
    assert {"label2", "mask2"} <= set(item)
    assert (ds.labels2 != ds.labels).all()
    assert not (ds.masks & ds.masks2).any()
    assert (ds.masks.flatten(1).sum(1) > 10).all() and (ds.masks2.flatten(1).sum(1) > 10).all()
    for i in range(0, 200, 17):  # object 2 has one colour, different from object 1
        o1, o2 = ds.images[i][:, ds.masks[i]], ds.images[i][:, ds.masks2[i]]
        assert (o2 == o2[:, :1]).all() and (o1 == o1[:, :1]).all()
    table = to_arrow_table(ds.arrays())
    back = from_arrow_table(table)
    assert list(back) == [f for f in RECORD_FIELDS if f in back] and set(back) == set(ds.arrays())
    for key, a in ds.arrays().items():
        assert back[key].dtype == a.dtype and np.array_equal(back[key], a), key


@pytest.mark.parametrize("kwargs, text", [
    ({"n": 0}, "n=0"), ({"size": 8}, "size=8"), ({"num_classes": 7}, "num_classes=7"),
    ({"num_classes": 1}, "2..6"), ({"bias": 1.5}, "bias=1.5"), ({"contrast": 0.0}, "contrast=0.0"),
    ({"split": "val"}, "split='val'"), ({"obj_scale": (0.5, 0.2)}, "obj_scale"),
    ({"split": "dwsol", "obj_scale": (0.3, 0.6)}, "0.5"), ({"seed": -1}, "seed=-1"),
])
def test_bad_arguments_raise(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")):
        BiasedShapes(**kwargs)


def test_ten_thousand_images_generate():
    ds = BiasedShapes(n=10_000, seed=0)
    assert ds.images.shape == (10_000, 3, 64, 64) and ds.masks.any((1, 2)).all()


def test_schema_float_images_paths_and_chunked_tables():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    arrays = {"image": rng.random((3, 3, 5, 4), dtype=np.float32), "label": np.array([2, 0, 1]),
              "mask": rng.random((3, 5, 4)) > 0.5, "box": np.array([[0, 1, 2, 3]] * 3),
              "path": np.array(["a/x.png", "b/y.png", "b/z.png"], dtype=object)}
    table = to_arrow_table(arrays)
    assert table.column_names == ["image", "image_shape", "label", "mask", "box", "path"]
    assert table.column("image_shape").to_pylist()[0] == [3, 5, 4]
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2)])  # as read back from shards
    back = from_arrow_table(chunked)
    for key, a in arrays.items():
        assert back[key].dtype == a.dtype and np.array_equal(back[key], a), key
    with pytest.raises(ValueError, match="colour"):
        to_arrow_table(dict(arrays, colour=np.zeros(3)))
    with pytest.raises(ValueError, match="mask has shape"):
        to_arrow_table(dict(arrays, mask=np.zeros((3, 4, 4), bool)))
