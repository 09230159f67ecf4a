"""Small fixtures in the exact on-disk layouts of CUB-200-2011, Waterbirds and PASCAL VOC 2012."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def write_cub(root: Path, n: int = 8) -> Path:
    """CUB_200_2011/: classes 1, 5 and 9 (ids with gaps), 80x60 and 60x90 images, boxes, segmentations."""
    root = root / "CUB_200_2011"
    classes = {1: "001.Black_footed_Albatross", 5: "005.Crested_Auklet", 9: "009.Brewer_Blackbird"}
    (root / "images").mkdir(parents=True)
    lines = {k: [] for k in ("images", "image_class_labels", "train_test_split", "bounding_boxes")}
    for i in range(1, n + 1):
        cid = list(classes)[i % 3]
        rel = f"{classes[cid]}/{classes[cid].split('.')[1]}_{i:04d}_{100 + i}.jpg"
        w, h = (80, 60) if i % 2 else (60, 90)
        _image(root / "images" / rel, w, h, i)
        seg = np.zeros((h, w), np.uint8)
        seg[10:30, 20:40] = 255
        seg[30:35, 20:40] = 102  # 2 of 5 annotators: not object
        (root / "segmentations" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(seg).save((root / "segmentations" / rel).with_suffix(".png"))
        lines["images"].append(f"{i} {rel}")
        lines["image_class_labels"].append(f"{i} {cid}")
        lines["train_test_split"].append(f"{i} {int(i <= n - 3)}")
        lines["bounding_boxes"].append(f"{i} 20.0 10.0 20.0 20.0")
    (root / "classes.txt").write_text("".join(f"{k} {v}\n" for k, v in classes.items()))
    for k, v in lines.items():
        (root / f"{k}.txt").write_text("\n".join(v) + "\n")
    return root


def write_waterbirds(root: Path) -> Path:
    """waterbird_complete95_forest2water2/: metadata.csv and images, all 4 groups in every split."""
    root = root / "waterbird_complete95_forest2water2"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    i = 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                i += 1
                rel = f"{'001.Black_footed_Albatross' if y else '002.Laysan_Albatross'}/img_{i:03d}.jpg"
                _image(root / rel, 50, 40, i)
                rows.append(f"{i},{rel},{y},{split},{place},/b/bamboo_forest/{i:08d}.jpg")
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _voc_xml(image_id: str, w: int, h: int, objects: list[tuple[str, int, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects)
    return (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


VOC_OBJECTS = {  # image id -> (W, H, objects (name, difficult, 1-based inclusive box))
    "2008_000001": (100, 80, [("dog", 0, (11, 21, 40, 60)), ("person", 0, (51, 1, 100, 80))]),
    "2008_000002": (80, 100, [("cat", 1, (1, 1, 30, 30)), ("cat", 1, (41, 41, 80, 100))]),
    "2008_000003": (100, 80, [("tvmonitor", 0, (21, 11, 60, 50))]),
    "2008_000004": (100, 80, [("dog", 0, (1, 1, 50, 40)), ("cat", 0, (51, 41, 100, 80)), ("dog", 1, (5, 5, 9, 9))]),
    "2008_000005": (90, 90, [("bird", 0, (31, 31, 60, 60))]),
    "2008_000006": (100, 80, [("person", 0, (1, 1, 20, 80))]),
}


def write_voc(root: Path, segment_all: bool = False) -> Path:
    """VOCdevkit/VOC2012/: JPEGImages, Annotations (a difficult flag), ImageSets/Main and Segmentation,
    a SegmentationClass palette PNG with a 255 (void) border; ``segment_all``: every image segmented (its
    boxes filled with class + 1, later objects on top, a void border row)."""
    root = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (root / d).mkdir(parents=True)
    for k, (image_id, (w, h, objs)) in enumerate(VOC_OBJECTS.items()):
        _image(root / "JPEGImages" / f"{image_id}.jpg", w, h, k)
        (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, w, h, objs))
    ids = list(VOC_OBJECTS)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids[:4]) + "\n")
    (root / "ImageSets/Main/val.txt").write_text("\n".join(ids[4:]) + "\n")
    (root / "ImageSets/Segmentation/train.txt").write_text("2008_000001\n")
    seg = np.zeros((80, 100), np.uint8)
    seg[20:60, 10:40] = 12  # dog (class 11) + 1
    seg[19, 10:40] = seg[60, 10:40] = 255  # the void border VOC draws around objects
    seg[0:80, 50:100] = 15  # person (14) + 1
    _palette_png(seg, root / "SegmentationClass" / "2008_000001.png")
    if segment_all:
        from xai_core.data.datasets import VOC_CLASSES

        for image_id, (w, h, objs) in list(VOC_OBJECTS.items())[1:]:
            seg = np.zeros((h, w), np.uint8)
            for name, _, (x0, y0, x1, y1) in objs:
                seg[y0 - 1:y1, x0 - 1:x1] = VOC_CLASSES.index(name) + 1
                seg[max(y0 - 2, 0), x0 - 1:x1] = 255
            _palette_png(seg, root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root


def _palette_png(seg: np.ndarray, path: Path) -> None:
    im = Image.fromarray(seg, mode="P")
    im.putpalette([v for i in range(256) for v in (i, 128, 255 - i)])
    im.save(path)


def write_difficult_subset(path: Path, flags: dict[str, list[int]]) -> Path:
    """TorchRay's pointing_game_ebp_voc07_difficult.txt layout: "<image id>\t" then 20 tab-separated 0/1 flags."""
    path.write_text("".join(f"{i}\t" + "\t".join(str(int(k in on)) for k in range(20)) + "\n"
                            for i, on in flags.items()))
    return path
