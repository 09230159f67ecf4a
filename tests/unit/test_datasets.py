"""Readers of CUB-200-2011, Waterbirds and PASCAL VOC 2012 on fixtures in their exact on-disk layouts."""

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from tests._datasets import VOC_OBJECTS, write_cub, write_difficult_subset, write_voc, write_waterbirds
from xai_core.data.datasets import IGNORE, VOC_CLASSES, load_record, read_cub, read_voc, read_waterbirds


def _reference_image(path, size):
    """torchvision's Resize(size) then CenterCrop(size) on the PIL image: the transform the readers promise."""
    with Image.open(path) as im:
        return np.asarray(TF.center_crop(TF.resize(im.convert("RGB"), size), size)).transpose(2, 0, 1)


def test_cub_classes_splits_boxes_and_masks(tmp_path):
    root = write_cub(tmp_path)
    ls = read_cub(root, val_fraction=0.2, seed=0)
    assert ls.classes == ["001.Black_footed_Albatross", "005.Crested_Auklet", "009.Brewer_Blackbird"]
    assert [len(ls.records[s]) for s in ("train", "val", "test")] == [4, 1, 3]  # 5 train ids, 1 held out
    test_ids = sorted(int(r.where.rsplit(" ", 1)[1]) for r in ls.records["test"])
    assert test_ids == [6, 7, 8]  # train_test_split.txt's 0 rows; val comes only out of train
    by_line = {int(r.where.rsplit(" ", 1)[1]): r for s in ls.records.values() for r in s}
    assert [by_line[i].label for i in range(1, 9)] == [1, 2, 0, 1, 2, 0, 1, 2]  # ids 5, 9, 1 -> 1, 2, 0
    r = by_line[1]  # 80x60: resized to 42x32, crop from x = 5
    assert r.boxes == ((20.0, 10.0, 40.0, 30.0),)
    out = load_record(r, 32, 3)
    np.testing.assert_array_equal(out["image"], _reference_image(r.path, 32))
    assert out["box"].tolist() == [5, 5, 16, 16]  # 20*42/80 - 5, 10*32/60, ceil(40*42/80) - 5, 30*32/60
    inside = np.zeros((32, 32), bool)
    inside[5:16, 5:16] = True
    assert not out["mask"][~inside].any() and out["mask"][inside].mean() > 0.8  # 102 (2 of 5) is background
    assert out["label"] == 1 and out["background"] == -1


def test_cub_bad_rows_are_named_or_skipped(tmp_path):
    root = write_cub(tmp_path)
    labels = (root / "image_class_labels.txt").read_text().splitlines()
    labels[1] = "2 7"  # class 7 is not in classes.txt
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    boxes = (root / "bounding_boxes.txt").read_text().splitlines()
    boxes[2] = "3 70.0 10.0 20.0 20.0"  # x1 = 90 > the 80 px width
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt line 2: image 2: class id 7 is not in classes.txt"):
        read_cub(root)
    ls = read_cub(root, on_bad_input="skip")
    assert [(w.rsplit("/", 1)[1], why) for w, why in ls.skipped] == [
        ("image_class_labels.txt line 2", "image 2: class id 7 is not in classes.txt"),
        ("bounding_boxes.txt line 3", "image 3: box (x0, y0, x1, y1) = (70.0, 10.0, 90.0, 30.0) is not inside "
                                      "the 80x60 image")]
    assert sum(len(v) for v in ls.records.values()) == 6
    first = (root / "images.txt").read_text().splitlines()[3].split()[1]
    (root / "images" / first).unlink()
    seg = next((root / "segmentations").rglob("*_0005_*.png"))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(seg)
    ls = read_cub(root, on_bad_input="skip")
    reasons = [why for _, why in ls.skipped]
    assert any(why.endswith(f"{first}' not found") for why in reasons)
    assert any("is 5x5 but its image is 80x60" in why for why in reasons)
    with pytest.raises(ValueError, match="CUB index file .*classes.txt' not found"):
        (root / "classes.txt").unlink()
        read_cub(root)


def test_waterbirds_splits_and_groups(tmp_path):
    root = write_waterbirds(tmp_path)
    ls = read_waterbirds(root)
    assert ls.classes == ["landbird", "waterbird"] and ls.groups == 4
    for s in ("train", "val", "test"):
        recs = ls.records[s]
        assert [(r.label, r.background, r.group) for r in recs] == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
    out = load_record(ls.records["test"][3], 16, 2)
    assert (out["label"], out["background"], out["group"]) == (1, 1, 3) and out["box"].tolist() == [-1] * 4
    np.testing.assert_array_equal(out["image"], _reference_image(ls.records["test"][3].path, 16))
    meta = (root / "metadata.csv").read_text().splitlines()
    fields = meta[5].split(",")
    meta[5] = ",".join(fields[:3] + ["3"] + fields[4:])  # split 3 does not exist
    (root / "metadata.csv").write_text("\n".join(meta) + "\n")
    with pytest.raises(ValueError, match=r"metadata.csv line 6: expected y in \{0, 1\}, split in \{0, 1, 2\}"):
        read_waterbirds(root)


def test_voc_multilabel_difficult_boxes_and_segmentation(tmp_path):
    root = write_voc(tmp_path)
    ls = read_voc(root, val_fraction=0.25, seed=0)
    assert ls.multilabel and ls.classes == list(VOC_CLASSES)
    assert [len(ls.records[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    recs = {r.path.rsplit("/", 1)[1][:-4]: r for s in ls.records.values() for r in s}
    dog, cat, person, tv = (VOC_CLASSES.index(c) for c in ("dog", "cat", "person", "tvmonitor"))
    r1 = recs["2008_000001"]
    assert r1.labels == (dog, person) and r1.boxes[0] == (10.0, 20.0, 40.0, 60.0) and r1.difficult_classes == ()
    assert recs["2008_000002"].difficult_classes == (cat,)  # both cats difficult
    assert recs["2008_000004"].labels == (cat, dog) and recs["2008_000004"].difficult_classes == ()
    assert recs["2008_000003"].seg_path is None and r1.seg_path.endswith("2008_000001.png")
    out = load_record(r1, 40, 20, multilabel=True)  # 100x80 -> 50x40, crop x from 5
    assert out["labels"].nonzero()[0].tolist() == [dog, person]
    assert out["box"].tolist() == [0, 10, 15, 30]  # (10, 20, 40, 60) * 0.5, minus (5, 0)
    expect = np.zeros((40, 40), bool)
    expect[10:30, 0:15] = True
    np.testing.assert_array_equal(out["class_masks"][dog], expect)
    np.testing.assert_array_equal(out["mask"], expect)  # the first object's class
    assert out["class_masks"][person][:, 20:].all() and not out["class_masks"][tv].any()
    seg_ref = np.asarray(TF.center_crop(TF.resize(Image.open(r1.seg_path), 40, TF.InterpolationMode.NEAREST), 40))
    np.testing.assert_array_equal(out["seg"], seg_ref)
    assert set(np.unique(out["seg"]).tolist()) == {0, dog + 1, person + 1, IGNORE}
    assert (load_record(recs["2008_000003"], 40, 20, multilabel=True)["seg"] == IGNORE).all()


def test_voc_difficult_subset_flags_the_test_pairs_as_torchray(tmp_path):
    """Test images 2008_000005 (bird) and 2008_000006 (person): the file flags 000005's bird and lists an image
    of another split; 000006 is not listed, so (TorchRay) its pairs stay in the subset."""
    root = write_voc(tmp_path)
    bird, person = VOC_CLASSES.index("bird"), VOC_CLASSES.index("person")
    flags = write_difficult_subset(tmp_path / "difficult.txt", {"2008_000005": [bird, 3], "2008_000001": [person]})
    ls = read_voc(root, val_fraction=0.25, difficult_subset=flags)
    test = {r.path.rsplit("/", 1)[1][:-4]: r for r in ls.records["test"]}
    assert test["2008_000005"].subset_classes == (bird,) and test["2008_000006"].subset_classes == (person,)
    assert all(r.subset_classes is None for s in ("train", "val") for r in ls.records[s])
    out = load_record(test["2008_000005"], 32, 20, multilabel=True)
    assert out["subset"].nonzero()[0].tolist() == [bird]
    assert "subset" not in load_record(ls.records["train"][0], 32, 20, multilabel=True)
    write_difficult_subset(flags, {"2008_000005": []})
    assert read_voc(root, difficult_subset=flags).records["test"][0].subset_classes == ()


def test_voc_difficult_subset_errors_name_the_file_and_line(tmp_path):
    root = write_voc(tmp_path)
    bad = tmp_path / "difficult.txt"
    bad.write_text("2008_000005\t" + "\t".join(["0"] * 20) + "\n2008_000006\t1\t0\n")
    with pytest.raises(ValueError, match=r"difficult.txt line 2: expected '<image id>' and 20 flags"):
        read_voc(root, difficult_subset=bad)
    write_difficult_subset(bad, {"000001": [1], "000002": []})  # VOC 2007 test ids: none is a test image here
    with pytest.raises(ValueError, match=r"lists none of the 2 test images .*VOC 2007 test"):
        read_voc(root, difficult_subset=bad)
    with pytest.raises(ValueError, match="nowhere.txt' not found: expected TorchRay's"):
        read_voc(root, difficult_subset=tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match=r"ImageSets/Main/test.txt' not found"):
        read_voc(root, test_list="test")


def test_voc_bad_objects_are_named(tmp_path):
    root = write_voc(tmp_path)
    xml = root / "Annotations" / "2008_000003.xml"
    xml.write_text(xml.read_text().replace("<xmax>60</xmax>", "<xmax>101</xmax>"))
    with pytest.raises(ValueError, match=r"2008_000003.xml object 1: box .* is not inside the 100x80 image"):
        read_voc(root)
    xml.write_text(xml.read_text().replace("tvmonitor", "television"))
    ls = read_voc(root, on_bad_input="skip")
    assert [why for _, why in ls.skipped] == ["unknown class name 'television' (expected one of VOC's 20)"]
    assert len(VOC_OBJECTS) - 1 == sum(len(v) for v in ls.records.values())


def test_records_survive_the_json_round_trip_ingest_hands_its_tasks(tmp_path):
    """Record.to_json / from_json (the Ray Data decode tasks' input): equal records, tuples kept (a list would
    not compare or hash equal), for every reader's fixture, boxes, masks, difficult and subset flags included."""
    from xai_core.data.datasets import Record

    voc = write_voc(tmp_path / "voc", segment_all=True)
    flags = write_difficult_subset(tmp_path / "d.txt", {"2008_000005": [2]})
    listings = [read_cub(write_cub(tmp_path / "cub", n=12)), read_waterbirds(write_waterbirds(tmp_path / "wb")),
                read_voc(voc, difficult_subset=flags)]
    recs = [r for ls in listings for split in ls.records.values() for r in split]
    assert any(r.boxes for r in recs) and any(r.subset_classes for r in recs) and any(r.mask_path for r in recs)
    for r in recs:
        back = Record.from_json(r.to_json())
        assert back == r and hash(back.boxes) == hash(r.boxes)
