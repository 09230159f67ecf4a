"""ImageFolderWithMasks: an ImageFolder (root/<class>/<image>) with optional object masks and boxes.

Items have the keys of BiasedShapes (``background`` and ``group`` are -1: unknown) plus ``path``
(relative to root, "<class>/<file>", as in the boxes CSV and ``skipped``).
Every image is decoded once in ``__init__`` to find bad input early; items are read lazily.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NO_BOX = (-1, -1, -1, -1)
_BAD_IMAGE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what PIL raises on corrupt files


def _non_finite(im: Image.Image) -> tuple[float, int, int] | None:
    """(value, row, column) of the first NaN/inf pixel of a floating-point image (TIFF mode F), else None."""
    if im.mode != "F":
        return None
    a = np.asarray(im, dtype=np.float32)
    bad = np.argwhere(~np.isfinite(a))
    if len(bad) == 0:
        return None
    r, c = (int(v) for v in bad[0])
    return float(a[r, c]), r, c


class ImageFolderWithMasks(torch.utils.data.Dataset):
    """root/<class>/<stem>.png|jpg; masks at mask_dir/<class>/<stem>.png (nonzero = object); boxes CSV.

    ``size`` (int or (H, W)) resizes images bilinearly, masks by nearest neighbour and scales boxes.
    ``on_bad_input``: "fail" raises ValueError naming an unreadable image or mask; "skip" leaves the
    sample out and records ``(path, reason)`` in ``self.skipped``. A mask whose size differs from its
    image always raises (a data error, not a bad file). Images without a mask get an all-False mask;
    images without a box get (-1, -1, -1, -1).
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int] | None = None,
                 mask_dir: str | Path | None = None, boxes_file: str | Path | None = None,
                 on_bad_input: str = "fail") -> None:
        if on_bad_input not in ("fail", "skip"):
            raise ValueError(f"on_bad_input={on_bad_input!r} is invalid: allowed values are 'fail', 'skip'")
        self.root = Path(root)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size={size!r} is invalid: allowed are a positive int or (height, width)")
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise ValueError(f"mask_dir {str(self.mask_dir)!r} is not a directory")
        if boxes_file is not None and not Path(boxes_file).is_file():
            raise ValueError(f"boxes_file {str(boxes_file)!r} is not a file")
        self.on_bad_input = on_bad_input
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                              ) if self.root.is_dir() else []  # hidden folders are not classes
        if not self.classes:
            raise ValueError(f"no class folders found in root {str(self.root)!r}: "
                             "expected root/<class>/<image>")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.skipped: list[tuple[str, str]] = []
        self.samples: list[tuple[str, int]] = []  # (path relative to root, label)
        empty = []
        for cls in self.classes:
            files = sorted(p for p in (self.root / cls).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                empty.append(cls)
            for f in files:
                rel = f"{cls}/{f.name}"
                reason = self._check(rel)
                if reason is None:
                    self.samples.append((rel, self.class_to_idx[cls]))
                elif on_bad_input == "skip":
                    self.skipped.append((rel, reason))
                else:
                    raise ValueError(f"bad input {str(f)!r}: {reason} (pass on_bad_input='skip' to skip it)")
        if empty:
            raise ValueError(f"class folders without images ({', '.join(IMAGE_EXTENSIONS)}) in root "
                             f"{str(self.root)!r}: {', '.join(empty)}")
        self.boxes = self._read_boxes(Path(boxes_file)) if boxes_file is not None else {}

    def _mask_path(self, rel: str) -> Path | None:
        if self.mask_dir is None:
            return None
        cls, name = rel.split("/", 1)
        p = self.mask_dir / cls / (Path(name).stem + ".png")
        return p if p.is_file() else None

    def _check(self, rel: str) -> str | None:
        """Decode the image (and read the mask header); return why it is bad, or None."""
        try:
            with Image.open(self.root / rel) as im:
                im.load()
                img_size = im.size
                bad = _non_finite(im)
        except _BAD_IMAGE as e:
            return f"unreadable image ({type(e).__name__}: {e})"
        if bad is not None:
            return f"non-finite pixel value {bad[0]} at row {bad[1]}, column {bad[2]} (expected finite values)"
        mp = self._mask_path(rel)
        if mp is not None:
            try:
                with Image.open(mp) as m:
                    m.load()
                    mask_size = m.size
            except _BAD_IMAGE as e:
                return f"unreadable mask {str(mp)!r} ({type(e).__name__}: {e})"
            if mask_size != img_size:  # a wrong mask is a data error, never skipped
                raise ValueError(f"mask {str(mp)!r} has size {mask_size} (W,H) but image "
                                 f"{str(self.root / rel)!r} has size {img_size}")
        return None

    def _read_boxes(self, path: Path) -> dict[str, tuple[int, int, int, int]]:
        """CSV with columns path,x0,y0,x1,y1 (path relative to root, inclusive-exclusive pixel box)."""
        known = {rel for rel, _ in self.samples} | {rel for rel, _ in self.skipped}
        boxes = {}
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            need = ["path", "x0", "y0", "x1", "y1"]
            if reader.fieldnames is None or not set(need) <= set(reader.fieldnames):
                raise ValueError(f"boxes file {str(path)!r} must have columns {','.join(need)}, "
                                 f"got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                rel = Path(row["path"]).as_posix()
                if rel not in known:
                    raise ValueError(f"boxes file {str(path)!r} line {line}: path {rel!r} is not an image "
                                     f"under root {str(self.root)!r}")
                try:
                    boxes[rel] = tuple(int(row[k]) for k in need[1:])
                except ValueError as e:
                    raise ValueError(f"boxes file {str(path)!r} line {line}: non-integer box {row}") from e
        return boxes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        rel, label = self.samples[i]
        with Image.open(self.root / rel) as im:
            image = TF.pil_to_tensor(im.convert("RGB"))
        h, w = image.shape[-2:]
        mp = self._mask_path(rel)
        if mp is not None:
            with Image.open(mp) as m:
                mask = TF.pil_to_tensor(m.convert("L"))[0] != 0
        else:
            mask = torch.zeros(h, w, dtype=torch.bool)
        box = self.boxes.get(rel, NO_BOX)
        if self.size is not None and (h, w) != self.size:
            image = TF.resize(image, list(self.size), InterpolationMode.BILINEAR, antialias=True)
            mask = TF.resize(mask[None].to(torch.uint8), list(self.size), InterpolationMode.NEAREST_EXACT)
            mask = mask[0] > 0
            if box != NO_BOX:
                sy, sx = self.size[0] / h, self.size[1] / w
                box = (math.floor(box[0] * sx), math.floor(box[1] * sy),  # grow outward, stay inside
                       min(self.size[1], math.ceil(box[2] * sx)), min(self.size[0], math.ceil(box[3] * sy)))
        return {"image": image.float() / 255.0, "label": label, "mask": mask, "box": box,
                "background": -1, "group": -1, "path": rel}
