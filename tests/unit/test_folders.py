"""ImageFolderWithMasks on a tiny folder built with PIL: labels, masks, boxes, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from xai_core.data.folders import ImageFolderWithMasks


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def folder(tmp_path):
    """Two classes ('cat' sorts before 'dog'); each image is red with a white 4x4 square at (x, y)."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    for cls, name, x, y in [("dog", "d1", 2, 3), ("dog", "d2", 8, 1), ("cat", "c1", 5, 5)]:
        img = np.zeros((16, 20, 3), np.uint8)
        img[..., 0] = 200
        img[y:y + 4, x:x + 4] = 255
        _png(root / cls / f"{name}.png", img)
        if name != "d2":  # d2 has no mask
            m = np.zeros((16, 20), np.uint8)
            m[y:y + 4, x:x + 4] = 1
            _png(masks / cls / f"{name}.png", m)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\ndog/d1.png,2,3,6,7\ncat/c1.png,5,5,9,9\n")
    return root, masks, boxes


def test_labels_masks_boxes(folder):
    root, masks, boxes = folder
    ds = ImageFolderWithMasks(root, mask_dir=masks, boxes_file=boxes)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3 and ds.skipped == []
    items = {it["path"].split("/")[-1]: it for it in (ds[i] for i in range(3))}
    c1, d1, d2 = items["c1.png"], items["d1.png"], items["d2.png"]
    assert (c1["label"], d1["label"], d2["label"]) == (0, 1, 1)
    assert c1["image"].shape == (3, 16, 20) and c1["image"].dtype == torch.float32
    assert c1["image"][0, 0, 0].item() == pytest.approx(200 / 255) and c1["image"][1, 6, 6].item() == 1.0
    expected = torch.zeros(16, 20, dtype=torch.bool)
    expected[3:7, 2:6] = True
    assert torch.equal(d1["mask"], expected)
    assert not d2["mask"].any() and d2["box"] == (-1, -1, -1, -1)
    assert d1["box"] == (2, 3, 6, 7) and c1["box"] == (5, 5, 9, 9)
    assert (d1["background"], d1["group"]) == (-1, -1)


def test_resize_scales_image_mask_and_box(folder):
    root, masks, boxes = folder
    ds = ImageFolderWithMasks(root, size=(32, 40), mask_dir=masks, boxes_file=boxes)
    d1 = next(ds[i] for i in range(3) if ds[i]["path"].endswith("d1.png"))
    assert d1["image"].shape == (3, 32, 40) and d1["mask"].shape == (32, 40)
    assert d1["mask"].sum().item() == 4 * 4 * 4  # nearest upsampling by 2 doubles each side
    ys, xs = d1["mask"].nonzero(as_tuple=True)
    assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (4, 6, 12, 14)
    assert d1["box"] == (4, 6, 12, 14)


def test_corrupt_image_fail_or_skip(folder):
    root, masks, _ = folder
    (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="bad.png"):
        ImageFolderWithMasks(root, mask_dir=masks)
    ds = ImageFolderWithMasks(root, mask_dir=masks, on_bad_input="skip")
    assert len(ds) == 3 and [p for p, _ in ds.skipped] == ["dog/bad.png"]
    assert "unreadable image" in ds.skipped[0][1]


def test_truncated_image_is_bad_input(folder):
    root, _, _ = folder
    data = (root / "cat" / "c1.png").read_bytes()
    (root / "cat" / "c2.png").write_bytes(data[: len(data) // 2])
    ds = ImageFolderWithMasks(root, on_bad_input="skip")
    assert [p for p, _ in ds.skipped] == ["cat/c2.png"]


def test_wrong_size_mask_names_file_and_sizes(folder):
    root, masks, _ = folder
    _png(masks / "cat" / "c1.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"c1\.png.*\(8, 8\).*\(20, 16\)"):
        ImageFolderWithMasks(root, mask_dir=masks, on_bad_input="skip")


def test_empty_root_and_bad_arguments(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderWithMasks(tmp_path / "empty")
    root, _, _ = folder
    with pytest.raises(ValueError, match="'ignore'"):
        ImageFolderWithMasks(root, on_bad_input="ignore")
    with pytest.raises(ValueError, match="no_masks_here"):
        ImageFolderWithMasks(root, mask_dir=tmp_path / "no_masks_here")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert ImageFolderWithMasks(root).classes == ["cat", "dog"]
    (root / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderWithMasks(root)


def test_boxes_file_errors(folder, tmp_path):
    root, _, _ = folder
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("file,x0,y0,x1,y1\ndog/d1.png,1,1,2,2\n")
    with pytest.raises(ValueError, match="columns"):
        ImageFolderWithMasks(root, boxes_file=bad_cols)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("path,x0,y0,x1,y1\ndog/nope.png,1,1,2,2\n")
    with pytest.raises(ValueError, match="nope.png"):
        ImageFolderWithMasks(root, boxes_file=unknown)
