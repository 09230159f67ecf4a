"""Readers for datasets as they are distributed: CUB-200-2011, Waterbirds, PASCAL VOC 2012.

A reader lists the dataset (``Listing``: classes, one ``Record`` per image and split, rows it left out)
from its own index files, without decoding images (only their headers, to check boxes and masks);
``load_record`` then decodes one record at ``size`` px: the image resized (shorter side to ``size``,
bilinear, antialiased) and center-cropped to size x size, its boxes and masks through the same transform.
Listing is cheap and runs where the job starts; decoding runs in Ray Data tasks (pipelines/ingest.py).

Conventions: boxes (x0, y0, x1, y1) in pixels, x1/y1 one past the last pixel (CUB's x, y, w, h gives
(x, y, x + w, y + h); VOC's 1-based inclusive xmin..xmax gives (xmin - 1, xmax)). Class ids become dense
indices in the order of the dataset's own ids (CUB's classes.txt may have gaps). Splits are "train",
"val", "test"; a dataset without a validation split gets one held out of its train split (seeded,
``val_fraction``), never out of test:
- cub: train_test_split.txt (1 = train); val held out of train. Masks from segmentations/ when that folder
  exists (CUB's masks average 5 annotators in 0..255: the object is >= 128, the majority).
- waterbirds: metadata.csv's split (0/1/2 = train/val/test), y (0 landbird, 1 waterbird), place (0 land,
  1 water): background = place, group = 2 y + place (its 4 groups).
- voc: ImageSets/Main/train.txt is train (val held out of it), ImageSets/Main/val.txt is test (VOC 2012's
  test annotations are not public). Multi-label: an image holds every class one of its objects has; a
  class whose objects are all "difficult" is flagged per image (TorchRay's pointing game leaves it out).
  Class masks are the union of the class's boxes (TorchRay's ``voc_as_mask``); SegmentationClass PNGs,
  where ImageSets/Segmentation lists the image, give ``seg`` (palette index = class + 1, 0 background,
  255 "ignore", kept as 255).
Bad rows (a missing file, a box outside its image, an unknown class id, a mask whose size differs from its
image's, a malformed line) raise a ValueError naming the file and line, or with ``on_bad_input="skip"``
are left out and listed in ``Listing.skipped`` as (where, reason).
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from xai_core.metrics.segmentation import IGNORE  # VOC's "void" label in SegmentationClass

SPLITS = ("train", "val", "test")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
WATERBIRDS_CLASSES = ("landbird", "waterbird")
_BAD_IMAGE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Record:
    """One image of a split, as listed: paths, labels and annotations in the image's own pixels."""

    path: str
    split: str
    where: str  # the index file and line it came from (for errors while decoding)
    label: int = -1  # single-label datasets; multi-label: the first class present
    labels: tuple[int, ...] = ()  # multi-label: every class present
    boxes: tuple[Box, ...] = ()
    box_classes: tuple[int, ...] = ()
    difficult_classes: tuple[int, ...] = ()  # multi-label: classes whose objects are all "difficult"
    subset_classes: tuple[int, ...] | None = None  # VOC test: classes of the pairs in TorchRay's difficult subset
    mask_path: str | None = None  # object mask (CUB: 0..255 annotator votes; an image folder's: nonzero)
    mask_threshold: int = 128  # a mask pixel >= this (in 0..255, after conversion to L) is object
    seg_path: str | None = None  # VOC SegmentationClass PNG
    background: int = -1
    group: int = -1

    def to_json(self) -> str:
        """The record as JSON (what ingest hands its Ray Data decode tasks); ``from_json`` inverts it."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Record:
        d = json.loads(text)
        d["boxes"] = tuple(tuple(b) for b in d["boxes"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Listing:
    name: str
    classes: list[str]
    records: dict[str, list[Record]]
    multilabel: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    groups: int = 0  # number of groups (waterbirds: 4), 0 when the dataset has none


class _Rows:
    """Collects bad rows: raises (on_bad_input="fail") or records them ("skip")."""

    def __init__(self, on_bad_input: str) -> None:
        if on_bad_input not in ("fail", "skip"):
            raise ValueError(f"on_bad_input={on_bad_input!r} is invalid: allowed values are 'fail', 'skip'")
        self.fail = on_bad_input == "fail"
        self.skipped: list[tuple[str, str]] = []

    def bad(self, where: str, reason: str) -> None:
        if self.fail:
            raise ValueError(f"{where}: {reason} (data.on_bad_input='skip' leaves such rows out)")
        self.skipped.append((where, reason))


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} not found: expected the dataset's layout as distributed")
    return path


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of each non-empty line."""
    with open(path) as f:
        return [(i, s.split()) for i, s in enumerate(f, start=1) if s.strip()]


def _image_size(path: Path) -> tuple[int, int] | str:
    """(W, H) from the image header, or why it cannot be read."""
    if not path.is_file():
        return f"image {str(path)!r} not found"
    try:
        with Image.open(path) as im:
            return im.size
    except _BAD_IMAGE as e:
        return f"unreadable image {str(path)!r} ({type(e).__name__}: {e})"


def _check_box(box: Box, size: tuple[int, int]) -> str | None:
    x0, y0, x1, y1 = box
    w, h = size
    if not (all(math.isfinite(v) for v in box) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        return f"box (x0, y0, x1, y1) = {tuple(round(v, 2) for v in box)} is not inside the {w}x{h} image"
    return None


def _check_mask(path: Path, size: tuple[int, int]) -> str | None:
    if not path.is_file():
        return f"mask {str(path)!r} not found"
    try:
        with Image.open(path) as m:
            msize = m.size
    except _BAD_IMAGE as e:
        return f"unreadable mask {str(path)!r} ({type(e).__name__}: {e})"
    if msize != size:
        return f"mask {str(path)!r} is {msize[0]}x{msize[1]} but its image is {size[0]}x{size[1]}"
    return None


def _hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, val): a seeded ``fraction`` of the train records moved to val, order kept."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction={fraction!r}: expected a fraction in (0, 1)")
    n_val = max(1, round(fraction * len(records))) if len(records) > 1 else 0
    pick = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
    val = [replace(r, split="val") for i, r in enumerate(records) if i in pick]
    return [r for i, r in enumerate(records) if i not in pick], val


def read_cub(root: str | Path, val_fraction: float = 0.1, seed: int = 0, on_bad_input: str = "fail") -> Listing:
    """CUB-200-2011 (root = the CUB_200_2011 folder: images/, images.txt, classes.txt, ...)."""
    root, rows = Path(root), _Rows(on_bad_input)
    files = {k: _need_file(root / f"{k}.txt", "CUB index file") for k in
             ("images", "classes", "image_class_labels", "train_test_split", "bounding_boxes")}

    def table(key: str, width: int) -> dict[str, tuple[str, list[str]]]:
        out = {}
        for line, f in _lines(files[key]):
            where = f"{files[key]} line {line}"
            if len(f) < width:
                rows.bad(where, f"expected {width} fields, got {len(f)}: {' '.join(f)!r}")
                continue
            out[f[0]] = (where, f[1:])
        return out

    dense, classes = _cub_classes(files["classes"])
    labels, splits, boxes = table("image_class_labels", 2), table("train_test_split", 2), table("bounding_boxes", 5)
    seg_dir = root / "segmentations"
    out: dict[str, list[Record]] = {"train": [], "test": []}
    for image_id, (where, (rel, *_)) in table("images", 2).items():
        path = root / "images" / rel
        size = _image_size(path)
        if isinstance(size, str):
            rows.bad(where, size)
            continue
        lab = labels.get(image_id)
        if lab is None or lab[1][0] not in dense:
            rows.bad(lab[0] if lab else where, f"image {image_id}: class id "
                     f"{lab[1][0] if lab else '(none)'} is not in {files['classes'].name}")
            continue
        sp = splits.get(image_id)
        if sp is None or sp[1][0] not in ("0", "1"):
            rows.bad(sp[0] if sp else where, f"image {image_id}: is_training_image must be 0 or 1, got "
                     f"{sp[1][0] if sp else '(none)'}")
            continue
        box_row = boxes.get(image_id)
        if box_row is None:
            rows.bad(where, f"image {image_id} has no line in {files['bounding_boxes'].name}")
            continue
        try:
            x, y, w, h = (float(v) for v in box_row[1][:4])
        except ValueError:
            rows.bad(box_row[0], f"non-numeric box {' '.join(box_row[1])!r}")
            continue
        box = (x, y, x + w, y + h)
        if (why := _check_box(box, size)) is not None:
            rows.bad(box_row[0], f"image {image_id}: {why}")
            continue
        mask = None
        if seg_dir.is_dir():
            mask = seg_dir / Path(rel).with_suffix(".png")
            if (why := _check_mask(mask, size)) is not None:
                rows.bad(where, why)
                continue
        split = "train" if sp[1][0] == "1" else "test"
        out[split].append(Record(path=str(path), split=split, where=where, label=dense[lab[1][0]], boxes=(box,),
                                 box_classes=(dense[lab[1][0]],), mask_path=str(mask) if mask else None))
    train, val = _hold_out(out["train"], val_fraction, seed)
    return Listing("cub", classes, {"train": train, "val": val, "test": out["test"]}, skipped=rows.skipped)


def read_waterbirds(root: str | Path, on_bad_input: str = "fail") -> Listing:
    """Waterbirds (root holds metadata.csv and the image folders it names)."""
    root, rows = Path(root), _Rows(on_bad_input)
    meta = _need_file(root / "metadata.csv", "Waterbirds metadata")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        need = {"img_filename", "y", "split", "place"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{meta}: columns {sorted(need)} are required, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            where = f"{meta} line {line}"
            try:
                y, split, place = int(row["y"]), int(row["split"]), int(row["place"])
            except (TypeError, ValueError):
                rows.bad(where, f"y, split and place must be integers, got {row['y']!r}, {row['split']!r}, "
                         f"{row['place']!r}")
                continue
            if y not in (0, 1) or split not in (0, 1, 2) or place not in (0, 1):
                rows.bad(where, f"expected y in {{0, 1}}, split in {{0, 1, 2}}, place in {{0, 1}}; got y={y}, "
                         f"split={split}, place={place}")
                continue
            path = root / row["img_filename"]
            if isinstance(size := _image_size(path), str):
                rows.bad(where, size)
                continue
            s = SPLITS[split]
            out[s].append(Record(path=str(path), split=s, where=where, label=y, background=place,
                                 group=2 * y + place))
    return Listing("waterbirds", list(WATERBIRDS_CLASSES), out, skipped=rows.skipped, groups=4)


def _voc_ids(path: Path) -> list[tuple[str, str]]:
    return [(f[0], f"{path} line {line}") for line, f in _lines(_need_file(path, "VOC image set"))]


def read_difficult_subset(path: str | Path, num_classes: int = len(VOC_CLASSES)) -> dict[str, tuple[bool, ...]]:
    """TorchRay's pointing-game "difficult" subset file (pointing_game_ebp_voc07_difficult.txt, from
    Zhang et al.'s excitation backprop): one line per image, "<image id>" then one 0/1 flag per class (tab
    or space separated); a flagged (image, class) pair is in the subset. Returns {image id: flags}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"difficult-subset flags {str(path)!r} not found: expected TorchRay's "
                         f"torchray/benchmark/pointing_game_ebp_voc07_difficult.txt (or a file in its layout)")
    out: dict[str, tuple[bool, ...]] = {}
    for line, f in _lines(path):
        if len(f) != num_classes + 1 or any(v not in ("0", "1") for v in f[1:]):
            raise ValueError(f"{path} line {line}: expected '<image id>' and {num_classes} flags (0 or 1), got "
                             f"{len(f) - 1} field(s) after {f[0]!r}")
        out[f[0]] = tuple(v == "1" for v in f[1:])
    return out


def read_voc(root: str | Path, val_fraction: float = 0.1, seed: int = 0, on_bad_input: str = "fail",
             test_list: str = "val", difficult_subset: str | Path | None = None) -> Listing:
    """PASCAL VOC (root = VOCdevkit/VOC2012 or VOC2007: JPEGImages/, Annotations/, ImageSets/,
    SegmentationClass/): ImageSets/Main/train.txt trains (``val_fraction`` held out for validation), the
    ``test_list`` file (val: VOC 2012's public test; test: VOC 2007 test) is the test split.
    ``difficult_subset``: TorchRay's flags file (``read_difficult_subset``); each test record then lists the
    classes of its pairs in the subset (``subset_classes``); as in TorchRay, an image the file does not list
    keeps every pair. A file that lists none of the test images is an error (it is for another split)."""
    root, rows = Path(root), _Rows(on_bad_input)
    seg_ids: set[str] = set()
    for name in ("train.txt", "val.txt", "trainval.txt"):
        p = root / "ImageSets" / "Segmentation" / name
        if p.is_file():
            seg_ids |= {i for i, _ in _voc_ids(p)}
    out: dict[str, list[Record]] = {"train": [], "test": []}
    flags = None if difficult_subset is None else read_difficult_subset(difficult_subset)
    listed = 0
    for split, set_file in (("train", "train.txt"), ("test", f"{test_list}.txt")):
        for image_id, where in _voc_ids(root / "ImageSets" / "Main" / set_file):
            rec = _voc_record(root, image_id, split, where, image_id in seg_ids, rows)
            if rec is not None and split == "test" and flags is not None:
                listed += image_id in flags
                keep = flags.get(image_id)
                rec = replace(rec, subset_classes=tuple(c for c in rec.labels if keep is None or keep[c]))
            if rec is not None:
                out[split].append(rec)
    if flags is not None and not listed:
        raise ValueError(f"{difficult_subset}: lists none of the {len(out['test'])} test images "
                         f"(ImageSets/Main/{test_list}.txt of {root}); TorchRay's file is for VOC 2007 test")
    train, val = _hold_out(out["train"], val_fraction, seed)
    return Listing("voc", list(VOC_CLASSES), {"train": train, "val": val, "test": out["test"]}, multilabel=True,
                   skipped=rows.skipped)


def _voc_record(root: Path, image_id: str, split: str, where: str, segmented: bool, rows: _Rows) -> Record | None:
    path, xml = root / "JPEGImages" / f"{image_id}.jpg", root / "Annotations" / f"{image_id}.xml"
    if isinstance(size := _image_size(path), str):
        rows.bad(where, size)
        return None
    if not xml.is_file():
        rows.bad(where, f"annotation {str(xml)!r} not found")
        return None
    try:
        objects = ET.parse(xml).getroot().findall("object")
    except ET.ParseError as e:
        rows.bad(str(xml), f"malformed XML ({e})")
        return None
    boxes, classes, difficult = [], [], []
    for k, obj in enumerate(objects, start=1):
        at = f"{xml} object {k}"
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            rows.bad(at, f"unknown class name {name!r} (expected one of VOC's 20)")
            return None
        try:
            bb = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            rows.bad(at, "bndbox needs numeric xmin, ymin, xmax, ymax")
            return None
        box = (xmin - 1, ymin - 1, xmax, ymax)  # 1-based inclusive -> 0-based, one past the last pixel
        if (why := _check_box(box, size)) is not None:
            rows.bad(at, why)
            return None
        boxes.append(box)
        classes.append(VOC_CLASSES.index(name))
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    if not boxes:
        rows.bad(str(xml), "no object: a multi-label image needs at least one class")
        return None
    present = sorted(set(classes))
    all_difficult = tuple(c for c in present if all(d for d, k in zip(difficult, classes) if k == c))
    seg = root / "SegmentationClass" / f"{image_id}.png"
    if segmented and (why := _check_mask(seg, size)) is not None:
        rows.bad(where, why)
        return None
    return Record(path=str(path), split=split, where=where, label=classes[0], labels=tuple(present),
                  boxes=tuple(boxes), box_classes=tuple(classes), difficult_classes=all_difficult,
                  seg_path=str(seg) if segmented else None)


def classes_of(source: str, root: str | Path) -> list[str]:
    """The class names of a dataset (cheap: its class list only), in the readers' index order."""
    if source == "waterbirds":
        _need_file(Path(root) / "metadata.csv", "Waterbirds metadata")
        return list(WATERBIRDS_CLASSES)
    if source == "voc":
        _need_file(Path(root) / "ImageSets" / "Main" / "train.txt", "VOC image set")
        return list(VOC_CLASSES)
    if source == "cub":
        return _cub_classes(_need_file(Path(root) / "classes.txt", "CUB index file"))[1]
    raise ValueError(f"unknown dataset {source!r}: expected one of {sorted(READERS)}")


def _cub_classes(path: Path) -> tuple[dict[str, int], list[str]]:
    """({CUB class id: dense index}, names) from classes.txt ("<id> <name>" lines, ids possibly with gaps)."""
    rows = {}
    for line, f in _lines(path):
        if len(f) < 2 or not f[0].isdigit():
            raise ValueError(f"{path} line {line}: expected '<integer class id> <name>', got {' '.join(f)!r}")
        rows[int(f[0])] = " ".join(f[1:])
    ids = sorted(rows)
    return {str(c): i for i, c in enumerate(ids)}, [rows[c] for c in ids]


READERS: dict[str, Callable[..., Listing]] = {"cub": read_cub, "waterbirds": read_waterbirds, "voc": read_voc}


# ----------------------------------------------------------------------------------------------- decoding
def _geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top) of torchvision's resize(shorter side = size) then center_crop(size)."""
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))


def _box_to(box: Box, w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """A box through the resize and crop, grown outward to whole pixels and clipped to the crop;
    (-1, -1, -1, -1) when the crop cuts it away."""
    nw, nh, left, top = _geometry(w, h, size)
    x0 = max(0, math.floor(box[0] * nw / w) - left)  # multiplied first: exact for whole-pixel boxes
    y0 = max(0, math.floor(box[1] * nh / h) - top)
    x1 = min(size, math.ceil(box[2] * nw / w) - left)
    y1 = min(size, math.ceil(box[3] * nh / h) - top)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else (-1, -1, -1, -1)


def _resized(im: Image.Image, size: int, resample: int) -> np.ndarray:
    w, h = im.size
    nw, nh, left, top = _geometry(w, h, size)
    return np.asarray(im.resize((nw, nh), resample).crop((left, top, left + size, top + size)))


def load_record(rec: Record, size: int, num_classes: int, multilabel: bool = False) -> dict[str, np.ndarray]:
    """One record decoded at ``size``: image uint8 [3,S,S], label, mask [S,S] (the object, or the first
    class's boxes), box [4] (the first box, or -1s), background, group; multi-label adds labels [K] (bool),
    class_masks [K,S,S] (union of each class's boxes), difficult [K] (all its objects difficult), subset [K]
    (the pairs in TorchRay's difficult subset, when the record lists them) and seg
    [S,S] (uint8: class + 1, 0 background, 255 ignore; all 255 without a SegmentationClass PNG)."""
    try:
        with Image.open(rec.path) as im:
            im = im.convert("RGB")
            w, h = im.size
            image = _resized(im, size, Image.Resampling.BILINEAR).transpose(2, 0, 1).copy()
    except _BAD_IMAGE as e:
        raise ValueError(f"{rec.where}: cannot decode {rec.path!r} ({type(e).__name__}: {e})") from None
    boxes = [_box_to(b, w, h, size) for b in rec.boxes]

    def box_mask(which: list[int]) -> np.ndarray:
        m = np.zeros((size, size), bool)
        for i in which:
            x0, y0, x1, y1 = boxes[i]
            if x0 >= 0:
                m[y0:y1, x0:x1] = True
        return m

    if rec.mask_path is not None:
        with Image.open(rec.mask_path) as m:
            mask = _resized(m.convert("L"), size, Image.Resampling.NEAREST) >= rec.mask_threshold
    else:
        mask = box_mask([i for i, c in enumerate(rec.box_classes) if c == rec.label])
    out = {"image": image, "label": np.int64(rec.label), "mask": mask,
           "box": np.array(boxes[0] if boxes else (-1, -1, -1, -1), np.int64),
           "background": np.int64(rec.background), "group": np.int64(rec.group)}
    if multilabel:
        hot = np.zeros(num_classes, bool)
        hot[list(rec.labels)] = True
        out["labels"] = hot
        out["class_masks"] = np.stack([box_mask([i for i, c in enumerate(rec.box_classes) if c == k])
                                       for k in range(num_classes)])
        diff = np.zeros(num_classes, bool)
        diff[list(rec.difficult_classes)] = True
        out["difficult"] = diff
        if rec.subset_classes is not None:  # TorchRay's difficult subset (read_difficult_subset)
            sub = np.zeros(num_classes, bool)
            sub[list(rec.subset_classes)] = True
            out["subset"] = sub
        if rec.seg_path is not None:
            with Image.open(rec.seg_path) as s:
                if s.mode not in ("P", "L"):
                    raise ValueError(f"{rec.where}: {rec.seg_path!r} must be a palette (P) or L PNG of class "
                                     f"indices, got mode {s.mode}")
                out["seg"] = _resized(s, size, Image.Resampling.NEAREST).astype(np.uint8)
        else:
            out["seg"] = np.full((size, size), IGNORE, np.uint8)
    return out


__all__ = ["IGNORE", "READERS", "SPLITS", "VOC_CLASSES", "WATERBIRDS_CLASSES", "Listing", "Record", "classes_of",
           "load_record",
           "read_cub", "read_difficult_subset", "read_voc", "read_waterbirds"]
