"""Worst-group accuracy on hand-made groups (sizes and accuracies chosen so each value is known)."""

import math

import pytest
import torch

from xai_core.metrics.groups import group_accuracy, group_ids


def test_worst_group_skips_groups_below_min_size():
    # group 0: 20 samples, 15 right (0.75); group 1: 25 samples, 20 right (0.8); group 2: 3 samples, 0 right
    correct = torch.tensor([1.0] * 15 + [0.0] * 5 + [1.0] * 20 + [0.0] * 5 + [0.0] * 3)
    groups = torch.tensor([0] * 20 + [1] * 25 + [2] * 3)
    res = group_accuracy(correct, groups, min_size=20)
    assert res["mean"] == pytest.approx(35 / 48)
    assert res["worst"] == pytest.approx(0.75) and res["group_mean"] == pytest.approx((0.75 + 0.8) / 2)
    assert res["groups"] == {0: (0.75, 20), 1: (0.8, 25), 2: (0.0, 3)} and res["small"] == [2]
    assert group_accuracy(correct, groups, min_size=1)["worst"] == 0.0  # the small group counts at min 1
    assert math.isnan(group_accuracy(correct, groups, min_size=100)["worst"])


def test_group_ids_pair_class_and_background():
    assert group_ids(torch.tensor([0, 2, 5]), torch.tensor([1, 0, 5]), 6).tolist() == [1, 12, 35]
    with pytest.raises(ValueError, match=r"background ids must be in \[0, 6\)"):
        group_ids(torch.tensor([0]), torch.tensor([6]), 6)
    with pytest.raises(ValueError, match="same non-empty length"):
        group_accuracy(torch.ones(3), torch.zeros(2))
