"""MaxBoxAccV2 against clovaai/wsolevaluation's BoxEvaluator (its code below, with OpenCV), and by hand."""

import numpy as np
import pytest
import torch

from xai_core.metrics import box_hits, max_box_acc, max_box_acc_v2
from xai_core.metrics.localisation import connected_components

cv2 = pytest.importorskip("cv2")  # installed with grad-cam (the test extra)


# --- clovaai/wsolevaluation, evaluation.py (MIT), as it is, but for numpy's int/float aliases ---
def calculate_multiple_iou(box_a, box_b):
    num_a, num_b = box_a.shape[0], box_b.shape[0]
    box_a = np.tile(box_a, num_b)
    box_a = np.expand_dims(box_a, axis=1).reshape((num_a, num_b, -1))
    box_b = np.tile(box_b, num_a)
    box_b = np.expand_dims(box_b, axis=1).reshape((num_b, num_a, -1))
    box_b = np.transpose(box_b, (1, 0, 2))
    min_x = np.maximum(box_a[:, :, 0], box_b[:, :, 0])
    min_y = np.maximum(box_a[:, :, 1], box_b[:, :, 1])
    max_x = np.minimum(box_a[:, :, 2], box_b[:, :, 2])
    max_y = np.minimum(box_a[:, :, 3], box_b[:, :, 3])
    area_intersect = (np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1))
    area_a = ((box_a[:, :, 2] - box_a[:, :, 0] + 1) * (box_a[:, :, 3] - box_a[:, :, 1] + 1))
    area_b = ((box_b[:, :, 2] - box_b[:, :, 0] + 1) * (box_b[:, :, 3] - box_b[:, :, 1] + 1))
    denominator = area_a + area_b - area_intersect
    degenerate_indices = np.where(denominator <= 0)
    denominator[degenerate_indices] = 1
    ious = area_intersect / denominator
    ious[degenerate_indices] = 0
    return ious


def compute_bboxes_from_scoremaps(scoremap, scoremap_threshold_list):
    height, width = scoremap.shape
    scoremap_image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)

    def scoremap2bbox(threshold):
        _, thr_gray_heatmap = cv2.threshold(src=scoremap_image, thresh=int(threshold * np.max(scoremap_image)),
                                            maxval=255, type=cv2.THRESH_BINARY)
        contours = cv2.findContours(image=thr_gray_heatmap, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            return np.asarray([[0, 0, 0, 0]]), 1
        estimated_boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            x0, y0, x1, y1 = x, y, x + w, y + h
            x1 = min(x1, width - 1)
            y1 = min(y1, height - 1)
            estimated_boxes.append([x0, y0, x1, y1])
        return np.asarray(estimated_boxes), len(contours)

    boxes, numbers = [], []
    for threshold in scoremap_threshold_list:
        b, n = scoremap2bbox(threshold)
        boxes.append(b)
        numbers.append(n)
    return boxes, numbers


def normalize_scoremap(cam):
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def reference_hits(maps, gt_boxes, thresholds, ious=(30, 50, 70)):
    """BoxEvaluator.accumulate, image by image: [B, D, T] whether the image counts as correct."""
    out = np.zeros((len(maps), len(ious), len(thresholds)), dtype=bool)
    for i, (cam, gts) in enumerate(zip(maps, gt_boxes)):
        scoremap = normalize_scoremap(cam.astype(np.float64).copy())
        at_thr, numbers = compute_bboxes_from_scoremaps(scoremap, thresholds)
        multiple_iou = calculate_multiple_iou(np.concatenate(at_thr, 0), np.array(gts))
        idx, sliced = 0, []
        for nr_box in numbers:
            sliced.append(max(multiple_iou.max(1)[idx:idx + nr_box]))
            idx += nr_box
        for d, thr in enumerate(ious):
            out[i, d, np.where(np.asarray(sliced) >= (thr / 100))[0]] = True
    return out
# ---


def _maps(seed: int, n: int, h: int, w: int) -> np.ndarray:
    """Blobby maps (upsampled noise, several peaks), rings with holes, edge blobs, a constant map."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 5, 6, generator=g) ** 3
    maps = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2).sqrt()
    maps[0] = torch.exp(-((r - 7) ** 2) / 4)  # a ring: its hole is a contour of its own
    maps[1] = ((yy < 4) & (xx > w - 6)).float() + 0.5 * ((yy > h - 3) & (xx < 3)).float()  # at the edges
    maps[2] = 0.3  # constant: zeros, no contour, box (0, 0, 0, 0)
    return maps.numpy().astype(np.float32)


def _boxes(seed: int, n: int, h: int, w: int) -> tuple[torch.Tensor, list]:
    rng = np.random.default_rng(seed)
    m = 3
    out = -np.ones((n, m, 4), dtype=np.int64)
    lists = []
    for i in range(n):
        k = rng.integers(1, m + 1)
        rows = []
        for _ in range(k):
            x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
            rows.append([x0, y0, rng.integers(x0 + 2, w + 1), rng.integers(y0 + 2, h + 1)])
        out[i, :k] = rows
        lists.append(rows)
    return torch.from_numpy(out), lists


@pytest.mark.parametrize("seed,h,w", [(0, 24, 32), (1, 31, 27)])
def test_hits_equal_wsolevaluation_box_evaluator(seed, h, w):
    n = 12
    maps, (boxes, lists) = _maps(seed, n, h, w), _boxes(seed, n, h, w)
    thresholds = np.arange(0, 1, 0.01)
    ref = reference_hits(maps, lists, thresholds)
    ours = box_hits(torch.from_numpy(maps), boxes, torch.from_numpy(thresholds)).numpy()
    assert ref.any() and not ref.all()
    np.testing.assert_array_equal(ours, ref)
    # MaxBoxAcc as BoxEvaluator.compute (percent there, fractions here)
    np.testing.assert_allclose(max_box_acc(torch.from_numpy(ours)).numpy() * 100, ref.mean(0).max(-1) * 100)


def test_default_grid_is_the_references_and_v2_is_the_mean_of_three():
    maps, (boxes, lists) = _maps(3, 6, 20, 20), _boxes(3, 6, 20, 20)
    ref = reference_hits(maps, lists, np.arange(0, 1, 0.001))
    assert max_box_acc_v2(torch.from_numpy(maps), boxes) == pytest.approx(ref.mean(0).max(-1).mean())


def test_levels_rows_give_the_same_max_box_acc_as_the_hits():
    from xai_core.metrics import box_iou_levels, max_box_acc_from_levels

    maps, (boxes, lists) = _maps(5, 10, 22, 26), _boxes(5, 10, 22, 26)
    m = torch.from_numpy(maps)
    levels = box_iou_levels(m, boxes)
    for grid in (None, torch.from_numpy(np.arange(0, 1, 0.01)), torch.tensor([0.0, 0.3, 0.95])):
        want = max_box_acc(box_hits(m, boxes, grid))
        torch.testing.assert_close(max_box_acc_from_levels(levels, grid), want)
    ref = reference_hits(maps, lists, np.arange(0, 1, 0.001))
    np.testing.assert_allclose(max_box_acc_from_levels(levels).numpy(), ref.mean(0).max(-1))
    assert (levels[2] == levels[2, 0]).all()  # the constant map: one box at every level


def test_by_hand_one_square_blob():
    """A 10x10 map: 0, with 0.5 on rows/cols 1-8 and 1 on the square rows/cols 2-5; ground truth (2, 2, 6, 6)
    exclusive = (2..6)^2 inclusive, 25 pixels. At t = 0 the foreground (q > 0) is the 8x8 region, box
    (1, 1, 9, 9) (one past its last pixel 8), 81 pixels: IoU 25/81. At t = 0.5 (q > 127) only the square
    remains, box (2, 2, 6, 6): IoU 1."""
    m = torch.zeros(1, 10, 10)
    m[0, 1:9, 1:9] = 0.5
    m[0, 2:6, 2:6] = 1.0
    hits = box_hits(m, torch.tensor([[2, 2, 6, 6]]), torch.tensor([0.0, 0.5]), iou_thresholds=(0.30, 0.31, 1.0))
    assert hits[0].tolist() == [[True, True], [False, True], [False, True]]
    assert max_box_acc(hits).tolist() == [1.0, 1.0, 1.0]
    hits = box_hits(m, torch.tensor([[2, 2, 6, 6]]), torch.tensor([0.0]), iou_thresholds=(25 / 81, 25 / 81 + 1e-9))
    assert hits[0, :, 0].tolist() == [True, False]
    # ground truth (0, 0, 3, 3) against the square's box: (2..3)^2 = 4 pixels of 16 + 25 - 4
    hits = box_hits(m, torch.tensor([[0, 0, 3, 3]]), torch.tensor([0.5]), iou_thresholds=(4 / 37, 4 / 37 + 1e-9))
    assert hits[0, :, 0].tolist() == [True, False]


def test_padding_rows_and_errors():
    m = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] have no ground-truth box"):
        box_hits(m, torch.tensor([[[0, 0, 4, 4]], [[-1, -1, -1, -1]]]))
    with pytest.raises(ValueError, match=r"boxes must have shape \[2, 4\]"):
        box_hits(m, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="cam_thresholds must be in"):
        box_hits(m, torch.zeros(2, 4), torch.tensor([1.5]))


def test_eight_connected_components():
    fg = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    assert connected_components(fg, 8).unique().tolist() == [0, 9]
    assert sorted(connected_components(fg, 4).unique().tolist()) == [0, 1, 5, 9]


# --- facebookresearch/TorchRay, torchray/benchmark/pointing_game.py (MIT): PointingGame, as it is ---
class TorchRayPointingGame:
    def __init__(self, num_classes, tolerance=15):
        self.tolerance = tolerance
        self.hits = torch.zeros((num_classes,), dtype=torch.float64)
        self.misses = torch.zeros((num_classes,), dtype=torch.float64)

    def evaluate(self, mask, point):
        v, u = torch.meshgrid(((torch.arange(mask.shape[0], dtype=torch.float32) - point[1]) ** 2,
                               (torch.arange(mask.shape[1], dtype=torch.float32) - point[0]) ** 2), indexing="ij")
        accept = (v + u) < self.tolerance ** 2
        return +1 if (mask & accept).view(-1).any() else -1

    def aggregate(self, hit, class_id):
        if hit == 1:
            self.hits[class_id] += 1
        elif hit == -1:
            self.misses[class_id] += 1

    @property
    def class_accuracies(self):
        return self.hits / (self.hits + self.misses).clamp(min=1)
# ---


def test_pointing_game_per_class_equals_torchray():
    from xai_core.metrics import pointing_game_per_class

    g = torch.Generator().manual_seed(0)
    p, h, w, k = 60, 40, 48, 5
    maps = torch.rand(p, h, w, generator=g)
    masks = torch.zeros(p, h, w, dtype=torch.bool)
    for i in range(p):  # one box per pair, anywhere
        y0 = int(torch.randint(0, h - 6, (1,), generator=g))
        x0 = int(torch.randint(0, w - 6, (1,), generator=g))
        masks[i, y0:y0 + 5, x0:x0 + 6] = True
    classes = torch.arange(p) % k
    keep = torch.rand(p, generator=g) > 0.2
    ref = TorchRayPointingGame(k, tolerance=15)
    for i in range(p):
        if keep[i]:
            idx = int(maps[i].flatten().argmax())
            ref.aggregate(ref.evaluate(masks[i], (idx % w, idx // w)), int(classes[i]))
    ours = pointing_game_per_class(maps, masks, classes, k, tolerance=15, keep=keep)
    assert 0 < float(ref.class_accuracies.mean()) < 1
    torch.testing.assert_close(ours, ref.class_accuracies)


def test_pointing_game_per_class_by_hand():
    """Argmax at (0, 0); class 0's mask pixel 3 px to the right: a miss at tolerance 3 (9 is not < 9), a hit
    at 3.5; class 1 never counted (empty mask, and a pair left out): NaN; class 2 one hit one miss."""
    from xai_core.metrics import pointing_game_per_class

    maps = torch.zeros(5, 8, 8)
    maps[:, 0, 0] = 1
    masks = torch.zeros(5, 8, 8, dtype=torch.bool)
    masks[0, 0, 3] = True
    masks[2, 0, 0] = masks[3, 7, 7] = masks[4, 1, 1] = True
    classes = torch.tensor([0, 1, 2, 2, 1])
    keep = torch.tensor([True, True, True, True, False])
    out = pointing_game_per_class(maps, masks, classes, 3, tolerance=3, keep=keep)
    assert out[0] == 0 and out[1].isnan() and out[2] == 0.5
    assert pointing_game_per_class(maps, masks, classes, 3, tolerance=3.5, keep=keep)[0] == 1
    with pytest.raises(ValueError, match=r"classes must be \[5\] class ids in \[0, 2\)"):
        pointing_game_per_class(maps, masks, classes, 2)


def test_pointing_game_strict_misses_at_exactly_the_tolerance():
    from xai_core.metrics import pointing_game

    maps = torch.zeros(1, 8, 8)
    maps[0, 0, 0] = 1
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 0, 3] = True  # 3 px from the argmax
    assert pointing_game(maps, masks, tolerance=3).item() == 1
    assert pointing_game(maps, masks, 3, strict=True).item() == 0
