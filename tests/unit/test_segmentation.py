"""WSSS pseudo-labels and mIoU: hand-computed cases and sklearn's jaccard_score as the reference."""

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from xai_core.metrics import best_background_threshold, miou, segmentation_counts, wsss_labels


def test_pseudo_labels_scale_each_map_and_take_the_largest_above_the_threshold():
    # image 0: maps for class 2 (max 4) and class 0 (max 1); image 1: one map for class 1, all <= 0
    a = torch.tensor([[4.0, 2.0, 0.0], [1.0, 3.0, -1.0]]).view(1, 2, 3)
    b = torch.tensor([[0.2, 1.0, 0.9], [0.1, 0.1, 0.5]]).view(1, 2, 3)
    c = -torch.ones(1, 2, 3)
    maps = torch.cat([a, b, c])
    lab = wsss_labels(maps, torch.tensor([0, 0, 1]), torch.tensor([2, 0, 1]), 2, [0.4, 0.8])
    # scaled: a = [[1, .5, 0], [.25, .75, 0]], b = [[.2, 1, .9], [.1, .1, .5]]; the larger one, then >= thr
    assert lab[0, 0].tolist() == [[3, 1, 1], [0, 3, 1]]
    assert lab[1, 0].tolist() == [[3, 1, 1], [0, 0, 0]]
    assert lab[:, 1].eq(0).all()  # a map with max <= 0 never reaches a threshold above 0


def test_equal_maps_go_to_the_pair_listed_first():
    m = torch.ones(2, 1, 2)
    assert wsss_labels(m, torch.tensor([0, 0]), torch.tensor([5, 3]), 1, 0.5)[0, 0].tolist() == [[6, 6]]


def test_counts_and_miou_equal_sklearn_jaccard_with_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (5, 6, 7), generator=g)
    gt = torch.randint(0, 4, (5, 6, 7), generator=g)
    gt[torch.rand(5, 6, 7, generator=g) < 0.2] = 255
    gt[gt == 3] = 255  # label 3 is then only ever predicted: its IoU is 0, not left out
    inter, union = segmentation_counts(pred, gt, 4)
    keep = (gt != 255).flatten().numpy()
    ref = jaccard_score(gt.flatten().numpy()[keep], pred.flatten().numpy()[keep], labels=[0, 1, 2, 3],
                        average=None, zero_division=0.0)
    value, per_label = miou(inter, union)
    assert np.allclose(per_label.numpy(), ref)
    assert per_label[3] == 0
    assert value == pytest.approx(np.nanmean(ref))


def test_a_label_absent_from_both_is_left_out_of_the_mean():
    pred = torch.tensor([[[0, 1], [1, 1]]])
    gt = torch.tensor([[[0, 1], [0, 255]]])
    inter, union = segmentation_counts(pred, gt, 3)
    assert inter.tolist() == [[1, 1, 0]] and union.tolist() == [[2, 2, 0]]
    value, per_label = miou(inter, union)
    assert value == pytest.approx(0.5) and per_label[2].isnan()


def test_background_threshold_is_chosen_by_dataset_miou():
    # one image, a 1x4 row: object on the right half; the scaled map is [0.1, 0.4, 0.6, 1.0]
    maps = torch.tensor([[[0.1, 0.4, 0.6, 1.0]]])
    gt = torch.tensor([[[0, 0, 1, 1]]])
    thresholds = [0.3, 0.5, 0.9]
    lab = wsss_labels(maps, torch.tensor([0]), torch.tensor([0]), 1, thresholds)
    counts = [segmentation_counts(lab[t], gt, 2) for t in range(3)]
    inter, union = torch.stack([c[0] for c in counts]), torch.stack([c[1] for c in counts])
    best, curve = best_background_threshold(inter, union, thresholds)
    # 0.3: bg IoU 1/2, fg 2/3; 0.5: both 1; 0.9: bg 2/3, fg 1/2
    assert curve == pytest.approx([(1 / 2 + 2 / 3) / 2, 1.0, (2 / 3 + 1 / 2) / 2])
    assert best == 0.5


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="gt holds label 7"):
        segmentation_counts(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7), 3)
    with pytest.raises(ValueError, match=r"image indices must be in \[0, 1\)"):
        wsss_labels(torch.ones(1, 2, 2), torch.tensor([1]), torch.tensor([0]), 1, 0.5)
    with pytest.raises(ValueError, match="thresholds must be in"):
        wsss_labels(torch.ones(1, 2, 2), torch.tensor([0]), torch.tensor([0]), 1, 1.5)


def test_miou_interval_covers_the_estimate_and_is_a_point_for_identical_images():
    from xai_core.metrics import miou_interval

    inter = torch.tensor([[1.0, 2.0]] * 4)
    union = torch.tensor([[2.0, 4.0]] * 4)
    assert miou_interval(inter, union) == pytest.approx((0.5, 0.5))
    g = torch.Generator().manual_seed(1)
    union = torch.randint(5, 20, (40, 3), generator=g).double()
    inter = (union * torch.rand(40, 3, generator=g)).floor()
    lo, hi = miou_interval(inter, union, seed=3)
    assert lo < miou(inter, union)[0] < hi
    assert (lo, hi) == miou_interval(inter, union, seed=3)  # seeded
