"""Unit tests of xai_core.metrics (METHODS §6): hand-computed values on tiny inputs, batched == per-sample."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xai_core.metrics import (
    constant_maps,
    deletion_auc,
    energy_pointing_game,
    gini,
    insertion_auc,
    localisation_iou,
    model_randomisation,
    pointing_game,
    pseudo_masks,
    spearman,
    wsol_top1_loc,
    wsss_miou,
)
from xai_core.metrics.faithfulness import gaussian_blur
from xai_core.metrics.localisation import box_iou, connected_components, largest_component_boxes


def seeded(fn, seed=0):
    """Build something random without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


class SmallCNN(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


def linear_model():
    """1x2x2 image -> 2 logits: l0 = x00 + 2 x01 + 3 x10 + 4 x11, l1 = 0; p0 = sigmoid(l0)."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
    return m


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def trapz(xs, ys):
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


# ---------------------------------------------------------------- faithfulness

def test_deletion_insertion_hand_linear_model():
    model, x = linear_model(), torch.ones(1, 1, 2, 2)
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # order: x11, x10, x01, x00
    auc, curves = deletion_auc(model, x, maps, torch.tensor([0]), n_steps=4, fill=0.0, return_curves=True)
    dele = [sig(v) for v in (10, 6, 3, 1, 0)]
    assert torch.allclose(curves[0], torch.tensor(dele), atol=1e-6)
    assert auc.item() == pytest.approx(0.25 * (dele[0] / 2 + sum(dele[1:4]) + dele[4] / 2), abs=1e-6)
    auc, curves = insertion_auc(model, x, maps, 0, n_steps=4, fill=0.0, return_curves=True)
    ins = [sig(v) for v in (0, 4, 7, 9, 10)]
    assert torch.allclose(curves[0], torch.tensor(ins), atol=1e-6)
    assert auc.item() == pytest.approx(trapz([0, 0.25, 0.5, 0.75, 1.0], ins), abs=1e-6)
    # target 1: p1 = 1 - p0
    auc1 = deletion_auc(model, x, maps, torch.tensor([1]), n_steps=4, fill=0.0)
    assert auc1.item() == pytest.approx(1 - trapz([0, 0.25, 0.5, 0.75, 1.0], dele), abs=1e-6)


def test_deletion_uneven_chunks_and_ties():
    model, x = linear_model(), torch.ones(1, 1, 2, 2)
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # n_steps=3 on 4 pixels: k*4//3 = 0, 1, 2, 4 pixels changed; x axis = share of pixels changed
    auc, curves = deletion_auc(model, x, maps, 0, n_steps=3, fill=0.0, return_curves=True)
    ys = [sig(v) for v in (10, 6, 3, 0)]
    assert torch.allclose(curves[0], torch.tensor(ys), atol=1e-6)
    assert auc.item() == pytest.approx(trapz([0, 0.25, 0.5, 1.0], ys), abs=1e-6)
    # a constant map: the stable sort removes pixels in row-major order
    _, curves = deletion_auc(model, x, torch.ones(1, 2, 2), 0, n_steps=4, fill=0.0, return_curves=True)
    assert torch.allclose(curves[0], torch.tensor([sig(v) for v in (10, 9, 7, 4, 0)]), atol=1e-6)
    # constant fill 0.5 and a tensor fill
    _, c_half = deletion_auc(model, x, maps, 0, n_steps=4, fill=0.5, return_curves=True)
    assert torch.allclose(c_half[0], torch.tensor([sig(v) for v in (10, 8, 6.5, 5.5, 5)]), atol=1e-6)
    _, c_t = deletion_auc(model, x, maps, 0, n_steps=4, fill=torch.tensor(0.5), return_curves=True)
    assert torch.equal(c_half, c_t)


def _batch():
    model = seeded(SmallCNN)
    x = seeded(lambda: torch.rand(3, 3, 8, 8), 1)
    maps = seeded(lambda: torch.rand(3, 8, 8), 2)
    return model, x, maps, torch.tensor([0, 2, 1])


@pytest.mark.parametrize("fn", [deletion_auc, insertion_auc])
def test_auc_batched_equals_per_sample_and_chunked(fn):
    model, x, maps, t = _batch()
    auc, curves = fn(model, x, maps, t, n_steps=5, return_curves=True)
    assert auc.shape == (3,) and curves.shape == (3, 6)
    for i in range(3):
        a_i, c_i = fn(model, x[i:i + 1], maps[i:i + 1], t[i:i + 1], n_steps=5, return_curves=True)
        assert torch.allclose(a_i[0], auc[i], atol=1e-6) and torch.allclose(c_i[0], curves[i], atol=1e-6)
    for cs in (1, 4, 7, 100):
        a_c, c_c = fn(model, x, maps, t, n_steps=5, chunk_size=cs, return_curves=True)
        assert torch.allclose(a_c, auc, atol=1e-6) and torch.allclose(c_c, curves, atol=1e-6)


def test_deletion_matches_plain_loop_with_blur():
    model, x, maps, t = _batch()
    n_steps = 4
    blurred = gaussian_blur(x)
    auc = deletion_auc(model, x, maps, t, n_steps=n_steps)
    n = 64
    for i in range(3):
        order = sorted(range(n), key=lambda j: (-maps[i].flatten()[j].item(), j))
        ys = []
        for k in range(n_steps + 1):
            img = x[i].clone().view(3, -1)
            for j in order[: k * n // n_steps]:
                img[:, j] = blurred[i].view(3, -1)[:, j]
            with torch.no_grad():
                ys.append(torch.softmax(model(img.view(1, 3, 8, 8)), 1)[0, t[i]].item())
        assert auc[i].item() == pytest.approx(trapz([k / n_steps for k in range(n_steps + 1)], ys), abs=1e-6)
        assert max(ys) - min(ys) > 1e-4  # the blur changes the prediction: not a trivial comparison


class _Counting(nn.Module):
    """Counts the images it forwards; with ``fmt`` it asks for (and checks) that input layout."""

    def __init__(self, inner, fmt=None):
        super().__init__()
        self.inner, self.rows, self.fmt = inner, 0, fmt
        if fmt is not None:
            self.input_memory_format = fmt

    def forward(self, x):
        self.rows += len(x)
        if self.fmt is not None:
            assert x.is_contiguous(memory_format=self.fmt)
        return self.inner(x)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_curve_set_equals_each_curve_alone_and_runs_the_shared_points_once(fmt):
    from xai_core.metrics.faithfulness import Curve, perturbation_curve_set, perturbation_curves

    model, x, maps, t = _batch()
    other = seeded(lambda: torch.rand(3, 8, 8), 5)
    series = {("a", "deletion"): Curve("deletion", maps), ("a", "insertion"): Curve("insertion", maps),
              ("b", "deletion"): Curve("deletion", other), ("b", "insertion"): Curve("insertion", other),
              "random": Curve("deletion", order="random", generator=torch.Generator().manual_seed(7))}
    alone = {}
    for key, c in series.items():
        gen = torch.Generator().manual_seed(7) if c.order == "random" else None
        alone[key], frac = perturbation_curves(model, x, other if key[0] == "b" else maps, t, n_steps=5,
                                               mode=c.mode, order=c.order, generator=gen)
    for cs in (None, 1, 4, 7, 100):
        series["random"] = series["random"]._replace(generator=torch.Generator().manual_seed(7))
        counted = _Counting(model, fmt)
        got, f = perturbation_curve_set(counted, x, t, series, n_steps=5, chunk_size=cs)
        assert torch.equal(f, frac) and set(got) == set(series)
        for key in series:
            torch.testing.assert_close(got[key], alone[key], rtol=0, atol=1e-6, msg=f"{key} chunk {cs}")
        # x and its blurred copy once for all 5 curves (2 x 3 images), then 4 inner points per curve and image
        assert counted.rows == 2 * 3 + 5 * 3 * 4  # alone: 5 x 3 x 6 = 90
    d, i = alone[("a", "deletion")], alone[("a", "insertion")]
    assert torch.equal(d[:, 0], i[:, -1]) and torch.equal(d[:, -1], i[:, 0])  # the shared end points
    assert not torch.allclose(alone["random"], d)  # the random order is another order


def test_curve_set_computes_an_image_once_per_mode_and_pixel_order():
    """Curves of the same mode whose maps rank an image's pixels alike (the same map doubled, a flat map and
    another flat map: both ranked by pixel index) share its inner points; the values equal each curve alone."""
    from xai_core.metrics.faithfulness import Curve, perturbation_curve_set, perturbation_curves

    model, x, maps, t = _batch()
    other = seeded(lambda: torch.rand(3, 8, 8), 5)
    mixed = other.clone()
    mixed[1] = 2 * maps[1] + 1  # image 1 ranked as by `maps`, images 0 and 2 as by `other`
    flat_a, flat_b = torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5)
    series = {"a": Curve("deletion", maps), "mixed": Curve("deletion", mixed), "b": Curve("deletion", other),
              "a_ins": Curve("insertion", maps), "flat_a": Curve("deletion", flat_a),
              "flat_b": Curve("deletion", flat_b), "flat_ins": Curve("insertion", flat_b)}
    counted = _Counting(model)
    got, _ = perturbation_curve_set(counted, x, t, series, n_steps=5, chunk_size=4)
    for key, c in series.items():
        alone, _ = perturbation_curves(model, x, c.maps, t, n_steps=5, mode=c.mode)
        torch.testing.assert_close(got[key], alone, rtol=0, atol=1e-6, msg=key)
    # end points 2 x 3; inner points (4 per image) for: a 3 images, mixed 2 (image 1 is a's), b 1 (images 0, 2
    # are mixed's), a_ins 3 (another mode), flat_a 3, flat_b 0 (flat_a's order), flat_ins 3
    assert counted.rows == 2 * 3 + 4 * (3 + 2 + 1 + 3 + 3 + 0 + 3)


def test_curve_set_one_step_and_errors():
    from xai_core.metrics.faithfulness import Curve, perturbation_curve_set

    model, x, maps, t = linear_model(), torch.ones(1, 1, 2, 2), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), 0
    counted = _Counting(model)
    got, frac = perturbation_curve_set(counted, x, t, {"d": Curve("deletion", maps), "i": Curve("insertion", maps)},
                                       n_steps=1, fill=0.0)
    assert counted.rows == 2 and frac.tolist() == [0.0, 1.0]  # the end points only
    assert torch.allclose(got["d"][0], torch.tensor([sig(10), sig(0)]), atol=1e-6)
    assert torch.allclose(got["i"][0], torch.tensor([sig(0), sig(10)]), atol=1e-6)
    with pytest.raises(ValueError, match="curve 'bad': mode='erase'"):
        perturbation_curve_set(model, x, t, {"bad": Curve("erase", maps)})
    with pytest.raises(ValueError, match="curve 'm': order='map' needs maps of shape"):
        perturbation_curve_set(model, x, t, {"m": Curve("deletion")})
    with pytest.raises(ValueError, match=r"curve 's': maps has shape \(1, 2, 3\)"):
        perturbation_curve_set(model, x, t, {"s": Curve("deletion", torch.ones(1, 2, 3))})


def test_gaussian_blur_kernel():
    x = seeded(lambda: torch.rand(2, 3, 16, 16), 3)
    # size 16: kernel 16 // 8 = 2 -> 3 (odd), sigma 16 / 16 = 1
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    g = g / g.sum()
    k2 = torch.outer(g, g).expand(3, 1, 3, 3)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    assert torch.allclose(gaussian_blur(x), ref, atol=1e-6)
    small = x[:, :, :8, :8]  # 8 // 8 = 1: the kernel is still at least 3 wide, so tiny images get blurred
    assert not torch.allclose(gaussian_blur(small), small)
    const = torch.full((1, 2, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(const), const)
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur(x, kernel_size=4)


def test_random_order_baseline_and_mode():
    model, x, maps, t = _batch()
    model.train()
    _, c_map = deletion_auc(model, x, maps, t, n_steps=4, return_curves=True)
    a1, c1 = deletion_auc(model, x, maps, t, n_steps=4, return_curves=True, order="random",
                          generator=torch.Generator().manual_seed(0))
    a2 = deletion_auc(model, x, maps, t, 4, order="random", generator=torch.Generator().manual_seed(0))
    a3 = deletion_auc(model, x, maps, t, 4, order="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert torch.allclose(c1[:, [0, -1]], c_map[:, [0, -1]], atol=1e-6)  # same images at both ends
    assert model.training
    model.eval()
    insertion_auc(model, x, maps, t, n_steps=2)
    assert not model.training


def test_faithfulness_bad_input():
    model, x, maps, t = _batch()
    with pytest.raises(ValueError, match="n_steps=0"):
        deletion_auc(model, x, maps, t, n_steps=0)
    with pytest.raises(ValueError, match="maps"):
        deletion_auc(model, x, maps[:, :4], t)
    with pytest.raises(ValueError, match="maps"):
        deletion_auc(model, x, maps[0], t)
    with pytest.raises(ValueError, match="fill"):
        deletion_auc(model, x, maps, t, fill="black")
    with pytest.raises(ValueError, match="order"):
        deletion_auc(model, x, maps, t, order="reverse")
    with pytest.raises(ValueError, match="chunk_size"):
        deletion_auc(model, x, maps, t, chunk_size=0)
    with pytest.raises(ValueError, match="target 5"):
        deletion_auc(model, x, maps, torch.tensor([0, 5, 1]), n_steps=2)


# ---------------------------------------------------------------- localisation

def test_pointing_game_hit_miss_nan():
    masks = torch.zeros(5, 8, 8, dtype=torch.bool)
    masks[:4, 2:4, 2:4] = True  # sample 4: empty mask
    maps = torch.zeros(5, 8, 8)
    maps[0, 2, 2] = 1.0  # inside
    maps[1, 2, 4] = 1.0  # 1 px right of the mask
    maps[2, 4, 4] = 1.0  # diagonal: sqrt(2) from (3,3)
    maps[3, 2, 5] = 1.0  # 2 px right
    maps[4, 2, 2] = 1.0
    for tol, want in ((0, [1, 0, 0, 0]), (1, [1, 1, 0, 0]), (1.5, [1, 1, 1, 0]), (2, [1, 1, 1, 1])):
        got = pointing_game(maps, masks, tolerance=tol)
        assert got[:4].tolist() == want and math.isnan(got[4].item()), tol
    # default tolerance: round(15 * 8 / 224) = 1
    assert torch.equal(pointing_game(maps, masks)[:4], pointing_game(maps, masks, tolerance=1)[:4])
    # batched == per-sample
    per = torch.cat([pointing_game(maps[i:i + 1], masks[i:i + 1], 1) for i in range(5)])
    assert torch.allclose(per, pointing_game(maps, masks, 1), equal_nan=True)
    with pytest.raises(ValueError, match="tolerance=-1"):
        pointing_game(maps, masks, tolerance=-1)
    with pytest.raises(ValueError, match="masks"):
        pointing_game(maps, masks[:, :4])


def test_energy_pointing_game_exact():
    maps = torch.tensor([[[1.0, 2.0], [3.0, -4.0]], [[-1.0, -2.0], [0.0, -3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    masks = torch.tensor([[[1, 0], [0, 1]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    got = energy_pointing_game(maps, masks)
    assert got[0].item() == pytest.approx(1 / 6)  # relu mass inside: 1 (+ 0 for -4), total 1+2+3
    assert got[1].item() == 0.0  # no positive mass
    assert math.isnan(got[2].item())  # empty mask
    per = torch.cat([energy_pointing_game(maps[i:i + 1], masks[i:i + 1]) for i in range(3)])
    assert torch.allclose(per, got, equal_nan=True)
    # float masks are accepted as booleans
    assert torch.allclose(energy_pointing_game(maps, masks.float()), got, equal_nan=True)


def test_localisation_iou_and_pseudo_masks():
    maps = torch.tensor([[[0.0, 0.2, 0.6, 1.0],
                          [0.0, 0.4, 0.5, 0.8],
                          [0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]]]).repeat(3, 1, 1)
    maps[1] = -maps[1]  # max <= 0: empty prediction
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:2, 0:2, 2:4] = True
    masks[:2, 2, 3] = True
    pm = pseudo_masks(maps, 0.5)  # >= 0.5: (0,2), (0,3), (1,2), (1,3)
    assert pm[0].sum() == 4 and pm[0, 0:2, 2:4].all() and not pm[1].any()
    got = localisation_iou(maps, masks)
    assert got[0].item() == pytest.approx(4 / 5)  # 4 shared, 5 in the union
    assert got[1].item() == 0.0 and math.isnan(got[2].item())
    assert localisation_iou(maps, masks, tau=0.0)[0].item() == pytest.approx(5 / 16)  # every pixel >= 0
    assert localisation_iou(maps, masks, tau=1.0)[0].item() == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="tau=1.5"):
        localisation_iou(maps, masks, tau=1.5)


def test_wsss_miou_hand():
    maps = torch.tensor([[[1.0, 0.2], [0.6, 0.0]], [[1.0, 0.2], [0.6, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[1, 1], [0, 0]], [[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    got, inter, union = wsss_miou(maps, masks, return_counts=True)
    # sample 0: pred fg {(0,0),(1,0)}: fg IoU 1/3, bg IoU 1/3
    assert got[0].item() == pytest.approx(1 / 3)
    assert got[1].item() == pytest.approx(1.0)
    assert got[2].item() == pytest.approx(1.0)  # fg absent in both: only the background IoU (1) counts
    assert inter[0].tolist() == [1, 1] and union[0].tolist() == [3, 3] and union[2].tolist() == [4, 0]
    per = torch.cat([wsss_miou(maps[i:i + 1], masks[i:i + 1]) for i in range(3)])
    assert torch.allclose(per, got)


def test_connected_components_match_scipy():
    from scipy import ndimage  # [test] extra: never skipped
    fg = seeded(lambda: torch.rand(6, 13, 11), 4) > 0.45
    spiral = torch.zeros(9, 9, dtype=torch.bool)  # a long snake needs many propagation rounds
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = spiral[2:7, 6] = True
    spiral[6, 2:7] = spiral[4:7, 2] = spiral[4, 2:5] = True
    fg = torch.cat([fg, F.pad(spiral, (0, 2, 0, 4)).unsqueeze(0)])
    lab = connected_components(fg)
    for i in range(fg.shape[0]):
        ref, n_ref = ndimage.label(fg[i].numpy())  # 4-connectivity by default
        ours = lab[i].numpy()
        pairs = {(a, b) for a, b in zip(ours.ravel(), ref.ravel())}
        assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs}) == n_ref + 1


def test_wsol_box_picks_largest_4_connected_component():
    maps = torch.zeros(2, 8, 8)
    maps[:, 0:2, 0:2] = 1.0  # 4 pixels
    maps[:, 2:5, 2:5] = 0.9  # 9 pixels, touching the first block only diagonally
    maps[1, 7, 7] = -1.0
    boxes = largest_component_boxes(maps, 0.5)
    assert boxes.tolist() == [[2, 2, 5, 5], [2, 2, 5, 5]]  # 8-connectivity would give [0, 0, 5, 5]
    assert largest_component_boxes(-maps.abs(), 0.5).tolist() == [[0, 0, 0, 0]] * 2
    gt = torch.tensor([[2, 2, 5, 5], [2, 2, 6, 6]])
    assert box_iou(boxes, gt).tolist() == pytest.approx([1.0, 9 / 16])
    got = wsol_top1_loc(maps, gt, torch.tensor([3, 3]), torch.tensor([3, 3]))
    assert got.tolist() == [1.0, 1.0]
    assert wsol_top1_loc(maps, gt, torch.tensor([3, 1]), torch.tensor([3, 3])).tolist() == [1.0, 0.0]
    assert wsol_top1_loc(maps, gt, torch.tensor([3, 3]), torch.tensor([3, 3]),
                         iou_threshold=0.6).tolist() == [1.0, 0.0]
    per = torch.cat([wsol_top1_loc(maps[i:i + 1], gt[i:i + 1], torch.tensor([3]), torch.tensor([3]))
                     for i in range(2)])
    assert torch.equal(per, got)
    with pytest.raises(ValueError, match="boxes"):
        wsol_top1_loc(maps, gt[:, :3], torch.tensor([3, 3]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="iou_threshold"):
        wsol_top1_loc(maps, gt, torch.tensor([3, 3]), torch.tensor([3, 3]), iou_threshold=2.0)


# ---------------------------------------------------------------- complexity

def test_gini_hand_values():
    # [0,0,0,1]: n=4, sorted a=[0,0,0,1]; coefficients 2k-n-1 = -3,-1,1,3; sum = 3*1 = 3;
    # n * sum(a) = 4 -> gini = 3/4
    maps = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.7, 0.7], [0.7, 0.7]], [[0.0, 0.0], [0.0, 0.0]],
                         [[1.0, -2.0], [3.0, 4.0]]])
    got = gini(maps)
    # [1,2,3,4] (abs of the last map): (-3*1 - 2 + 3 + 3*4) / (4 * 10) = 10 / 40
    assert got.tolist() == pytest.approx([0.75, 0.0, 0.0, 0.25])
    assert got[1].item() == 0.0  # exactly zero for a constant map
    per = torch.cat([gini(maps[i:i + 1]) for i in range(4)])
    assert torch.allclose(per, got)
    with pytest.raises(ValueError, match="maps"):
        gini(maps.flatten(1))


def test_gini_matches_quantus():
    import quantus  # [test] extra: never skipped
    maps = seeded(lambda: torch.randn(4, 6, 6), 5)
    ref = quantus.Sparseness(disable_warnings=True).evaluate_batch(x_batch=None, a_batch=maps.abs().numpy())
    assert torch.allclose(gini(maps), torch.as_tensor(ref, dtype=torch.float32), atol=1e-5)


# ---------------------------------------------------------------- sanity

def test_spearman_ties_constant_and_scipy():
    a = torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    got = spearman(a, b)
    # ranks [1.5,1.5,3] vs [1,2,3]: centred [-.5,-.5,1] . [-1,0,1] = 1.5; norms sqrt(1.5), sqrt(2)
    assert got[0].item() == pytest.approx(1.5 / math.sqrt(3))
    assert got[1].item() == pytest.approx(-1.0) and math.isnan(got[2].item())
    from scipy import stats  # [test] extra: never skipped
    x = seeded(lambda: torch.randint(0, 4, (5, 4, 5)).float(), 6)
    y = seeded(lambda: torch.randint(0, 5, (5, 4, 5)).float(), 7)
    ours = spearman(x, y)
    for i in range(5):
        ref = stats.spearmanr(x[i].flatten().numpy(), y[i].flatten().numpy())[0]
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)


def _rand_setup():
    model = seeded(lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(4 * 6 * 6, 3)))
    x = seeded(lambda: torch.rand(2, 1, 6, 6), 8)
    return model, x, torch.tensor([0, 2])


def saliency_fn(m, x, t):
    x = x.clone().requires_grad_(True)
    out = m(x).gather(1, t.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(out, x)
    return g.abs().amax(1)


def test_model_randomisation_cascade():
    model, x, t = _rand_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = model_randomisation(model, x, t, saliency_fn)
    assert list(res) == ["3", "0"]  # children with parameters, output first
    assert all(v.shape == (2,) for v in res.values())
    assert (res["0"] < 0.9).all() and (res["3"] < 0.99).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert torch.equal(rng, torch.get_rng_state())  # global RNG untouched
    again = model_randomisation(model, x, t, saliency_fn)
    assert all(torch.equal(res[k], again[k]) for k in res)  # seeded
    # a map that ignores the model: every layer keeps correlation 1
    flat = model_randomisation(model, x, t, lambda m, xx, tt: xx.sum(1), layer_order=["3", "1", "0"])
    assert all(torch.allclose(v, torch.ones(2)) for v in flat.values())
    # batched == per-sample
    per = model_randomisation(model, x[1:], t[1:], saliency_fn)
    assert all(torch.allclose(per[k][0], res[k][1], atol=1e-6) for k in res)


def test_constant_maps_by_hand():
    maps = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.2, 0.2], [0.2, 0.2]], [[0.0, 0.0], [0.0, 1e-9]]])
    assert constant_maps(maps).tolist() == [True, True, False]


def test_model_randomisation_reports_the_maps_that_turn_constant():
    # a map that is the input's channel sum while layer "3" keeps its trained weights, all zero once re-drawn
    # (a learned mask that collapses on a random classifier): its Spearman is undefined, and says so
    model, x, t = _rand_setup()
    trained = model[3].weight.detach().clone()

    def fn(m, xx, tt):
        keep = torch.equal(m[3].weight, trained)
        return xx.sum(1) if keep else torch.zeros_like(xx.sum(1))

    constant: dict = {}
    res = model_randomisation(model, x, t, fn, constant=constant)
    assert list(constant) == ["trained", "3", "0"]
    assert constant["trained"].tolist() == [False, False]
    assert constant["3"].tolist() == [True, True] and constant["0"].tolist() == [True, True]
    assert torch.isnan(res["3"]).all() and torch.isnan(res["0"]).all()
    # and a map that varies everywhere: nothing constant, the correlations defined
    constant = {}
    res = model_randomisation(model, x, t, saliency_fn, constant=constant)
    assert not any(v.any() for v in constant.values()) and not any(torch.isnan(v).any() for v in res.values())


def test_model_randomisation_bad_layer():
    model, x, t = _rand_setup()
    with pytest.raises(ValueError, match="fc"):
        model_randomisation(model, x, t, saliency_fn, layer_order=["fc"])


# ---------------------------------------------------------------- sorting (the metrics' and SCAAT's ranking)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("descending", [False, True])
def test_stable_argsort_equals_torch_stable_sort(dtype, descending):
    from xai_core._tensor import sort_rows, stable_argsort

    # Ties (values drawn from 5 levels), both zeros, infinities, NaNs of both signs, tiny and huge values.
    x = seeded(lambda: torch.randint(-2, 3, (6, 300)).to(torch.float32) * 0.25, 9)
    x[0, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-38, -1e-38, 3e38, -3e38])
    x[1, 5], x[1, 7] = float("nan"), -float("nan")
    x[2] = -0.0
    x = x.to(dtype)
    ref = torch.sort(x, dim=1, descending=descending, stable=True).indices
    assert torch.equal(stable_argsort(x, descending=descending), ref)
    assert stable_argsort(x).dtype == torch.int64
    values = sort_rows(x)
    assert values.dtype == dtype
    torch.testing.assert_close(values, torch.sort(x, dim=1).values, rtol=0, atol=0, equal_nan=True)
    # the ranking every user of it needs: the value order, ties in index order
    order = stable_argsort(x[3:4], descending=descending)[0].tolist()
    vals = x[3].tolist()
    assert order == sorted(range(300), key=lambda i: (-vals[i] if descending else vals[i], i))
