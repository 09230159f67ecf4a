"""BiasedShapes: the built-in benchmark with ground-truth masks and a known spurious background (METHODS §7).

Class k draws shape k (circle, square, triangle, cross, star, ring) on background texture family j
(stripes, checks, dots, waves, noise, gradient). With probability ``bias`` the family equals the class
("aligned", group 0), otherwise it is one of the other families uniformly ("conflicting", group 1).
Everything is generated eagerly in ``__init__``, vectorised per chunk and per class / family, from one
seeded ``torch.Generator``: the same arguments give identical bytes.

Calibration (METHODS §7; SmallResNet width 16, Adam 1e-3, batch 128, 3000 balanced test images): at the
default contrast 0.1 and train bias 0.9, 8000 train images x 12 epochs gave aligned / conflicting test
accuracy 98.0 / 25.7 % (seed 0) and 98.6 / 33.4 % (seed 1); contrast 0.05 gave 98.6 / 44.4 %. With 4000
train images (10 or 20 epochs) conflicting stayed at 2-9 %: the model memorises the few conflicting
images instead of learning the shapes, so use >= 8000 train images when debiasing is to be measured.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from xai_core._tensor import seeded_generator

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
TEXTURES = ("stripes", "checks", "dots", "waves", "noise", "gradient")
SPLITS = ("train", "test", "dwsol", "multilabel")
MAX_OBJECTS = 3  # multilabel split: 1-3 objects of distinct classes, each in its own quadrant
TRAIN_BIAS = 0.9  # METHODS §7: train default; test and dwsol default to 1/K (balanced)
MIN_COLOUR_DIST = 0.35  # mean |object - background base| over the channels (shape learnability)
_CHUNK = 1024  # images rendered at once (bounds memory); the noise texture stream depends on it: keep fixed


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


class BiasedShapes(torch.utils.data.Dataset):
    """Seeded biased-shapes dataset; ``ds[i]`` is a dict (see module docstring and DESIGN's public API).

    ``bias=None`` means the split's default: 0.9 for train, 1/K (balanced by chance) for test and dwsol.
    Images are stored as uint8 in ``self.images`` [N,3,S,S]; ``ds[i]["image"]`` is float32 in [0,1].
    """

    def __init__(self, n: int = 1000, seed: int = 0, size: int = 64, num_classes: int = 6,
                 bias: float | None = None, split: str = "train", contrast: float = 0.1,
                 obj_scale: tuple[float, float] = (0.25, 0.4)) -> None:
        _check(isinstance(n, int) and n >= 1, f"n={n!r} is invalid: allowed values are integers >= 1")
        _check(isinstance(seed, int) and seed >= 0, f"seed={seed!r} is invalid: allowed values are ints >= 0")
        _check(isinstance(size, int) and size >= 16, f"size={size!r} is invalid: allowed are ints >= 16")
        _check(isinstance(num_classes, int) and 2 <= num_classes <= len(SHAPES),
               f"num_classes={num_classes!r} is invalid: allowed range is 2..{len(SHAPES)}")
        _check(split in SPLITS, f"split={split!r} is invalid: allowed values are {', '.join(SPLITS)}")
        if bias is None:
            bias = TRAIN_BIAS if split == "train" else 1.0 / num_classes
        _check(0.0 <= float(bias) <= 1.0, f"bias={bias!r} is out of range: allowed values are in [0, 1]")
        _check(0.0 < float(contrast) <= 1.0, f"contrast={contrast!r} is out of range: allowed is (0, 1]")
        lo, hi = (float(v) for v in obj_scale)
        max_hi = 0.5 if split in ("dwsol", "multilabel") else 1.0  # each object must fit in its half/quadrant
        _check(0.0 < lo <= hi <= max_hi,
               f"obj_scale={tuple(obj_scale)!r} is invalid: need 0 < low <= high <= {max_hi} "
               f"for split {split!r}")
        self.n, self.seed, self.size, self.num_classes = n, seed, size, num_classes
        self.bias, self.split, self.contrast, self.obj_scale = float(bias), split, float(contrast), (lo, hi)
        self._generate()

    # ----------------------------------------------------------------------------------------------
    def _generate(self) -> None:
        n, s, k = self.n, self.size, self.num_classes
        # Mix the split into the seed so that train/test/dwsol with one seed never share images.
        g = seeded_generator(self.seed, self.split)
        # Per-sample parameters, drawn in a fixed order for all N at once.
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # classes balanced to +-1
        aligned = torch.rand(n, generator=g) < self.bias
        other = (labels + torch.randint(1, k, (n,), generator=g)) % k
        backgrounds = torch.where(aligned, labels, other)
        c = self.contrast
        base = min(c, 0.5) + torch.rand(n, 3, generator=g) * max(1 - 2 * c, 0.0)
        tex_params = torch.rand(n, 4, generator=g)
        if self.split == "multilabel":
            return self._generate_multilabel(g, labels, backgrounds, base, tex_params)
        region = None
        if self.split == "dwsol":
            labels2 = (labels + torch.randint(1, k, (n,), generator=g)) % k
            region = torch.randint(0, 4, (n,), generator=g)  # 0/1: left/right half, 2/3: top/bottom half
        obj1 = self._object_params(labels, base, g, region)
        if region is not None:
            obj2 = self._object_params(labels2, base, g, region ^ 1)  # the other half
        images = torch.empty(n, 3, s, s, dtype=torch.uint8)
        masks = torch.empty(n, s, s, dtype=torch.bool)
        masks2 = torch.empty(n, s, s, dtype=torch.bool) if self.split == "dwsol" else None
        for start in range(0, n, _CHUNK):
            sl = slice(start, min(start + _CHUNK, n))
            img = _textures(backgrounds[sl], tex_params[sl], s, g) * c + base[sl, :, None, None]
            m1 = _draw(img, labels[sl], {key: v[sl] for key, v in obj1.items()}, s)
            if masks2 is not None:
                m2 = _draw(img, labels2[sl], {key: v[sl] for key, v in obj2.items()}, s)
                m1 &= ~m2  # object 2 is drawn on top; halves make this a no-op in practice
                masks2[sl] = m2
            masks[sl] = m1
            images[sl] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        self.images, self.labels, self.masks = images, labels, masks
        self.backgrounds, self.groups = backgrounds, (backgrounds != labels).long()
        self.boxes = _boxes(masks)
        if masks2 is not None:
            self.labels2, self.masks2 = labels2, masks2

    def _generate_multilabel(self, g: torch.Generator, first: torch.Tensor, backgrounds: torch.Tensor,
                             base: torch.Tensor, tex_params: torch.Tensor) -> None:
        """1..MAX_OBJECTS objects of distinct classes per image (the first one's class is ``labels``, whose
        bias ties the background to it), each in its own quadrant: ``label_sets`` [N,K] multi-hot and
        ``class_masks`` [N,K,S,S]; ``masks``/``boxes`` are the first object's (so that a single-label
        consumer gets a consistent (label, mask) pair), ``groups`` compares the background with the first
        class."""
        n, s, k, c = self.n, self.size, self.num_classes, self.contrast
        count = torch.randint(1, MAX_OBJECTS + 1, (n,), generator=g)
        others = torch.argsort(torch.rand(n, k, generator=g), dim=1)  # a random order of the classes
        others = others[others != first[:, None]].view(n, k - 1)  # ... without the first class
        classes = torch.cat([first[:, None], others], 1)[:, :MAX_OBJECTS]
        quadrant = torch.argsort(torch.rand(n, 4, generator=g), dim=1)[:, :MAX_OBJECTS]
        objs = [self._object_params(classes[:, j], base, g, None, quadrant[:, j]) for j in range(MAX_OBJECTS)]
        images = torch.empty(n, 3, s, s, dtype=torch.uint8)
        class_masks = torch.zeros(n, k, s, s, dtype=torch.bool)
        for start in range(0, n, _CHUNK):
            sl = slice(start, min(start + _CHUNK, n))
            img = _textures(backgrounds[sl], tex_params[sl], s, g) * c + base[sl, :, None, None]
            for j, obj in enumerate(objs):
                idx = (count[sl] > j).nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                rows = idx + start
                sub = img[idx]
                m = _draw(sub, classes[rows, j], {key: v[rows] for key, v in obj.items()}, s)
                img[idx] = sub
                class_masks[rows, classes[rows, j]] = m
            images[sl] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        label_sets = torch.zeros(n, k, dtype=torch.bool)
        for j in range(MAX_OBJECTS):
            rows = (count > j).nonzero().squeeze(1)
            label_sets[rows, classes[rows, j]] = True
        self.images, self.labels, self.masks = images, first, class_masks[torch.arange(n), first]
        self.backgrounds, self.groups = backgrounds, (backgrounds != first).long()
        self.boxes = _boxes(self.masks)
        self.label_sets, self.class_masks = label_sets, class_masks

    def _object_params(self, labels: torch.Tensor, base: torch.Tensor, g: torch.Generator,
                       region: torch.Tensor | None, quadrant: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """Random scale, rotation, centre (object fully inside the image, its half ``region`` or its
        ``quadrant``: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) and contrasting colour."""
        n, s = labels.shape[0], float(self.size)
        lo, hi = self.obj_scale
        radius = (lo + (hi - lo) * torch.rand(n, generator=g)) * s / 2
        angle = torch.rand(n, generator=g) * 2 * math.pi
        u = torch.rand(n, 2, generator=g)
        cx = radius + u[:, 0] * (s - 2 * radius)
        cy = radius + u[:, 1] * (s - 2 * radius)
        if region is not None:  # confine the object to one half: x in [0,S/2] or [S/2,S] (or y)
            half = (region % 2) * s / 2 + radius + u[:, 0] * (s / 2 - 2 * radius)
            horiz = region < 2
            cx, cy = torch.where(horiz, half, cy), torch.where(horiz, cy, half)
        if quadrant is not None:  # x in [0,S/2] or [S/2,S] by quadrant % 2, y by quadrant // 2
            cx = (quadrant % 2) * s / 2 + radius + u[:, 0] * (s / 2 - 2 * radius)
            cy = (quadrant // 2) * s / 2 + radius + u[:, 1] * (s / 2 - 2 * radius)
        colour = torch.rand(n, 3, generator=g)
        for _ in range(100):  # redraw colours too close to the background; stream stays deterministic
            bad = (colour - base).abs().mean(1) < MIN_COLOUR_DIST
            if not bad.any():
                break
            colour[bad] = torch.rand(int(bad.sum()), 3, generator=g)
        far = (base < 0.5).float()  # every channel at its far end: mean distance >= 0.5
        colour = torch.where(((colour - base).abs().mean(1) < MIN_COLOUR_DIST)[:, None], far, colour)
        return {"radius": radius, "angle": angle, "cx": cx, "cy": cy, "colour": colour}

    # ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for BiasedShapes of length {self.n}")
        item = {
            "image": self.images[i].float() / 255.0,
            "label": int(self.labels[i]),
            "mask": self.masks[i],
            "box": tuple(int(v) for v in self.boxes[i]),
            "background": int(self.backgrounds[i]),
            "group": int(self.groups[i]),
        }
        if self.split == "dwsol":
            item["label2"], item["mask2"] = int(self.labels2[i]), self.masks2[i]
        if self.split == "multilabel":
            item["labels"], item["class_masks"] = self.label_sets[i], self.class_masks[i]
        return item

    def arrays(self) -> dict[str, np.ndarray]:
        """All fields as numpy arrays (image stays uint8 [N,3,S,S]; divide by 255 for [0,1])."""
        out = {"image": self.images.numpy(), "label": self.labels.numpy(), "mask": self.masks.numpy(),
               "box": self.boxes.numpy(), "background": self.backgrounds.numpy(),
               "group": self.groups.numpy()}
        if self.split == "dwsol":
            out["label2"], out["mask2"] = self.labels2.numpy(), self.masks2.numpy()
        if self.split == "multilabel":
            out["labels"], out["class_masks"] = self.label_sets.numpy(), self.class_masks.numpy()
        return out


# --------------------------------------------------------------------------------------------------
def _grid(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (x, y), each [1,S,S]."""
    r = torch.arange(s, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(r, r, indexing="ij")
    return x[None], y[None]


def _textures(family: torch.Tensor, p: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    """Texture patterns in [-1,1], [B,1,S,S]; family j of TEXTURES, parameters p [B,4] in [0,1)."""
    b = family.shape[0]
    out = torch.empty(b, s, s)
    noise = torch.rand(b, s, s, generator=g) * 2 - 1  # drawn for all: the stream is family-independent
    x, y = _grid(s)
    for j in range(len(TEXTURES)):
        idx = (family == j).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        q = [p[idx, i, None, None] for i in range(4)]
        theta = q[0] * math.pi
        along = x * torch.cos(theta) + y * torch.sin(theta)
        across = -x * torch.sin(theta) + y * torch.cos(theta)
        if j == 0:  # stripes at a random angle, period 10-20% of the side
            pat = torch.sign(torch.sin(2 * math.pi * (along / (s * (0.1 + 0.1 * q[1])) + q[2])))
        elif j == 1:  # axis-aligned checks, cell 8-15% of the side
            cell = s * (0.08 + 0.07 * q[1])
            pat = torch.sign(torch.sin(math.pi * (x / cell + q[2])) * torch.sin(math.pi * (y / cell + q[3])))
        elif j == 2:  # dot lattice, spacing 12-20% of the side, dot radius 30% of spacing
            sp = s * (0.12 + 0.08 * q[1])
            dx = torch.remainder(x / sp + q[2], 1.0) - 0.5
            dy = torch.remainder(y / sp + q[3], 1.0) - 0.5
            pat = torch.where(dx * dx + dy * dy < 0.09, 1.0, -1.0)
        elif j == 3:  # smooth waves: a sinusoid whose phase wobbles along the other axis
            lam = s * (0.12 + 0.08 * q[1])
            wobble = 0.1 * s * torch.sin(2 * math.pi * across / (0.4 * s))
            pat = torch.sin(2 * math.pi * ((along + wobble) / lam + q[2]))
        elif j == 4:  # i.i.d. pixel noise
            pat = noise[idx]
        else:  # linear gradient across the image at a random angle
            centre = s / 2 * (torch.cos(theta) + torch.sin(theta))
            pat = ((along - centre) / (s / 2 * math.sqrt(2))).clamp(-1, 1)
        out[idx] = pat.expand(idx.numel(), s, s)
    return out[:, None]


def _shape_mask(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shape k in local coordinates (u, v), every shape inside the unit disc."""
    rho2 = u * u + v * v
    if k == 0:  # circle
        return rho2 <= 1.0
    if k == 1:  # square inscribed in the unit circle
        return torch.maximum(u.abs(), v.abs()) <= 1 / math.sqrt(2)
    if k == 2:  # equilateral triangle, circumradius 1 (inradius 0.5)
        ang = torch.tensor([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        return ((u[..., None] * torch.cos(ang) + v[..., None] * torch.sin(ang)) <= 0.5).all(-1)
    if k == 3:  # plus-shaped cross, arm half-width 0.3
        a, b = u.abs(), v.abs()
        return ((a <= 0.3) & (b <= 0.9)) | ((b <= 0.3) & (a <= 0.9))
    if k == 4:  # five-pointed star: fold the angle into one tip sector, test against the straight edge
        sector = 2 * math.pi / 5
        beta = (torch.remainder(torch.atan2(v, u), sector) - sector / 2).abs()  # 0: inner vertex
        rho = rho2.sqrt()
        px, py = rho * torch.cos(beta), rho * torch.sin(beta)
        ix, tx, ty = 0.4, math.cos(sector / 2), math.sin(sector / 2)  # inner vertex, tip
        # inside when on the origin's side of the edge inner->tip (the origin gives ty * ix > 0)
        return (tx - ix) * py - ty * (px - ix) >= 0
    return (rho2 <= 1.0) & (rho2 >= 0.5**2)  # ring


def _draw(img: torch.Tensor, labels: torch.Tensor, obj: dict[str, torch.Tensor], s: int) -> torch.Tensor:
    """Paint each sample's opaque object into img [B,3,S,S] in place; return the masks [B,S,S]."""
    x, y = _grid(s)
    masks = torch.zeros(labels.shape[0], s, s, dtype=torch.bool)
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().squeeze(1)
        r, a = obj["radius"][idx, None, None], obj["angle"][idx, None, None]
        dx, dy = x - obj["cx"][idx, None, None], y - obj["cy"][idx, None, None]
        u = (torch.cos(a) * dx + torch.sin(a) * dy) / r
        v = (-torch.sin(a) * dx + torch.cos(a) * dy) / r
        masks[idx] = _shape_mask(k, u, v)
    img.copy_(torch.where(masks[:, None], obj["colour"][:, :, None, None], img))
    return masks


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes (x0, y0, x1, y1), inclusive-exclusive, of masks [N,S,S]; (-1,)*4 when empty."""
    s = masks.shape[-1]
    cols, rows = masks.any(1), masks.any(2)
    x0, y0 = cols.float().argmax(1), rows.float().argmax(1)
    x1, y1 = s - cols.flip(1).float().argmax(1), s - rows.flip(1).float().argmax(1)
    box = torch.stack([x0, y0, x1, y1], 1).long()
    box[~cols.any(1)] = -1
    return box
