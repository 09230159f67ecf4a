"""xai_core.metrics.wsol against sklearn (average_precision_score, jaccard_score) and hand cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, jaccard_score

from xai_core.metrics import wsol


def test_pxap_hand_case_with_a_tie():
    # scores 0.9 (pos), 0.5 (neg), 0.5 (pos), 0.1 (neg): thresholds 0.9 -> P 1, R 1/2; 0.5 -> P 2/3, R 1
    maps = torch.tensor([[[0.9, 0.5], [0.5, 0.1]]])
    masks = torch.tensor([[[True, False], [True, False]]])
    assert wsol.pxap(maps, masks).item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("levels", [None, 4])  # continuous maps, and maps with many ties
def test_pxap_equals_sklearn_per_image(levels):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 12, 10, generator=g)
    if levels:
        maps = (maps * levels).floor() / levels
    masks = torch.rand(6, 12, 10, generator=g) < 0.3
    got = wsol.pxap(maps, masks)
    for i in range(6):
        want = average_precision_score(masks[i].flatten().numpy(), maps[i].flatten().numpy())
        assert got[i].item() == pytest.approx(want, abs=1e-6)


def test_pxap_edge_cases():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[1] = True
    got = wsol.pxap(torch.rand(2, 3, 3), masks)
    assert np.isnan(got[0].item()) and got[1].item() == pytest.approx(1.0)  # no positive; all positive
    flat = torch.zeros(1, 4, 4)
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :1] = True
    assert wsol.pxap(flat, m).item() == pytest.approx(0.25)  # one threshold: precision = the mask's share
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        wsol.pxap(torch.rand(4, 4), m[0])


def test_dataset_pxap_pools_the_norm01_maps():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 8, 8, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0]).view(4, 1, 1) + 3
    masks = torch.rand(4, 8, 8, generator=g) < 0.4
    scaled = [(m - m.min()) / (m.max() - m.min()) for m in maps]
    want = average_precision_score(masks.flatten().numpy(), torch.stack(scaled).flatten().numpy())
    assert wsol.dataset_pxap(maps, masks) == pytest.approx(want, abs=1e-6)
    # unlike the per-image mean, it depends on the scale across images only through norm01: unchanged here
    assert wsol.dataset_pxap(maps * 7 - 1, masks) == pytest.approx(want, abs=1e-6)


def test_iou_curve_best_threshold_and_iou_at_equal_sklearn():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(5, 6, 6, generator=g)
    masks = torch.rand(5, 6, 6, generator=g) < 0.5
    t = torch.tensor([0.0, 0.3, 0.6, 0.9])
    curve = wsol.iou_curve(maps, masks, t)
    scaled = wsol.norm01_maps(maps)
    for i in range(5):
        for j, thr in enumerate(t):
            want = jaccard_score(masks[i].flatten().numpy(), (scaled[i] >= thr).flatten().numpy())
            assert curve[i, j].item() == pytest.approx(want)
    best = wsol.best_threshold(maps, masks, t)
    assert best == float(t[curve.mean(0).argmax()])
    assert torch.equal(wsol.iou_at(maps, masks, best), curve[:, int((t == best).nonzero())])
    with pytest.raises(ValueError, match=r"each in \[0, 1\]"):
        wsol.iou_curve(maps, masks, torch.tensor([1.5]))
