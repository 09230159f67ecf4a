"""Explanation-consistency reweighting (METHODS §5a) and SCAAT (METHODS §5b)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.unit._models import TinyCNN, colour_squares
from xai_core._tensor import norm01
from xai_core.attribution import explain
from xai_core.objectives import (
    consistency_weights,
    explanation_consistency,
    normalise_weights,
    scaat_loss,
    weighted_cross_entropy,
)
from xai_core.objectives.consistency import map_similarity

torch.set_num_threads(1)


class BNNet(nn.Module):
    """conv-BN-relu-conv-relu-pool-fc: a model whose BatchNorm statistics an attack could move."""

    cam_layer = "conv2"
    default_layers = ["conv1", "conv2"]

    def __init__(self, num_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def trained():
    """TinyCNN trained for 60 steps of SGD with momentum (by hand; a fraction of a second)."""
    x, y, _ = colour_squares(24, seed=0)
    model = TinyCNN(num_classes=3)
    params = list(model.parameters())
    mom = [torch.zeros_like(p) for p in params]
    for _ in range(60):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g, m in zip(params, grads, mom):
                m.mul_(0.9).add_(g)
                p -= 0.1 * m
    return model.eval()


# ---------------------------------------------------------------- similarities (hand examples)
def _sim(a, b, kind):
    return map_similarity(torch.tensor([a]), torch.tensor([b]), kind).item()


def test_cosine_hand_examples():
    assert _sim([1.0, 0.0], [1.0, 1.0], "cosine") == pytest.approx(1 / math.sqrt(2))
    assert _sim([1.0, 0.0], [0.0, 1.0], "cosine") == 0.0
    assert _sim([0.0, 0.0], [0.0, 0.0], "cosine") == 1.0  # two empty maps: identical
    assert _sim([0.0, 0.0], [0.0, 1.0], "cosine") == 0.0  # one empty map
    assert _sim([0.3, 0.7, 0.1], [0.3, 0.7, 0.1], "cosine") == 1.0  # exactly


def test_pearson_hand_examples():
    # deviations [-1,0,1] and [-1,1,0]: cov 1, variances 2 -> r = 0.5 -> (r+1)/2 = 0.75
    assert _sim([0.0, 1.0, 2.0], [0.0, 2.0, 1.0], "pearson") == pytest.approx(0.75)
    assert _sim([0.0, 1.0, 2.0], [2.0, 1.0, 0.0], "pearson") == pytest.approx(0.0)
    assert _sim([0.0, 1.0, 2.0], [0.0, 2.0, 4.0], "pearson") == pytest.approx(1.0)
    assert _sim([1.0, 1.0, 1.0], [0.0, 1.0, 2.0], "pearson") == 0.5  # constant map: r undefined -> 0
    assert _sim([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], "pearson") == 1.0  # identical constant maps


def test_js_hand_examples():
    assert _sim([1.0, 0.0], [0.0, 1.0], "js") == pytest.approx(0.0, abs=1e-7)  # disjoint: JS = 1 bit
    assert _sim([2.0, 0.0], [1.0, 0.0], "js") == pytest.approx(1.0)  # same distribution after sum-to-1
    # p = [.5,.5], q = [1,0], m = [.75,.25]: KL(p||m) = .5 log2(2/3) + .5 log2(2); KL(q||m) = log2(4/3)
    js = 0.5 * (0.5 * math.log2(2 / 3) + 0.5 + math.log2(4 / 3))
    assert _sim([1.0, 1.0], [1.0, 0.0], "js") == pytest.approx(1 - js)  # 0.68872
    assert _sim([0.0, 0.0], [1.0, 0.0], "js") == 0.0


def test_similarity_is_batched_per_sample():
    a = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0))
    b = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(1))
    for kind in ("cosine", "pearson", "js"):
        batched = map_similarity(a, b, kind)
        single = torch.cat([map_similarity(a[i:i + 1], b[i:i + 1], kind) for i in range(5)])
        torch.testing.assert_close(batched, single)
        assert ((batched >= 0) & (batched <= 1)).all()


def test_unknown_similarity_names_the_allowed_values(trained):
    x, y, _ = colour_squares(2, seed=1)
    with pytest.raises(ValueError, match=r"'dice'.*cosine\|pearson\|js"):
        explanation_consistency(trained, x, y, similarity="dice")
    with pytest.raises(ValueError, match=r"'l2'.*cosine\|pearson\|js"):
        map_similarity(torch.ones(1, 2, 2), torch.ones(1, 2, 2), "l2")


# ---------------------------------------------------------------- weights
def test_normalise_weights_hand_example():
    # v = [0,1,3]: v/mean(v) = [0, .75, 2.25]; floor .1 -> [.1, .75, 2.25], mean 3.1/3;
    # / mean -> [.3, 2.25, 6.75] / 3.1 = [3, 22.5, 67.5] / 31
    w = normalise_weights(torch.tensor([0.0, 1.0, 3.0]), power=1.0, w_min=0.1)
    torch.testing.assert_close(w, torch.tensor([3.0, 22.5, 67.5]) / 31)
    # power 2: v^2 = [0,1,9], / mean 10/3 -> [0, .3, 2.7]; floor -> [.1, .3, 2.7] -> [3, 9, 81] / 31
    w2 = normalise_weights(torch.tensor([0.0, 1.0, 3.0]), power=2.0, w_min=0.1)
    torch.testing.assert_close(w2, torch.tensor([3.0, 9.0, 81.0]) / 31)
    assert w2[2] / w2[1] > w[2] / w[1]  # power 2 sharpens
    assert w.mean().item() == pytest.approx(1.0) and w2.mean().item() == pytest.approx(1.0)


def test_normalise_weights_mean_one_all_zero_and_errors():
    v = torch.rand(50, generator=torch.Generator().manual_seed(0))
    for power in (0.5, 1.0, 3.0):
        w = normalise_weights(v, power=power)
        assert w.mean().item() == pytest.approx(1.0)
        assert (w[v.argsort()].diff() >= 0).all()  # non-decreasing in v (ties at the floor)
    assert torch.equal(normalise_weights(torch.zeros(4)), torch.ones(4))  # nothing to prefer
    with pytest.raises(ValueError, match=r"-0\.5"):
        normalise_weights(torch.tensor([0.1, -0.5]))
    with pytest.raises(ValueError, match=r"1-D"):
        normalise_weights(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"power=-1"):
        normalise_weights(torch.ones(3), power=-1)
    with pytest.raises(ValueError, match=r"w_min=2"):
        normalise_weights(torch.ones(3), w_min=2)


def test_normalise_weights_cap_hand_example():
    # w (power 1, floor .1) = [3, 22.5, 67.5] / 31 = [.0968, .7258, 2.1774]; cap 1.5: the largest -> 1.5,
    # the other two share 3 - 1.5 = 1.5 in their ratio 3 : 22.5 -> [1.5 * 3/25.5, 1.5 * 22.5/25.5]
    w = normalise_weights(torch.tensor([0.0, 1.0, 3.0]), power=1.0, w_min=0.1, w_max=1.5)
    torch.testing.assert_close(w, torch.tensor([1.5 * 3 / 25.5, 1.5 * 22.5 / 25.5, 1.5]))
    # a second weight crosses the cap once the first is capped: v = [0, 0, 4, 5] -> w = [.1, .1, 1.6, 2] / .95
    # = [.105, .105, 1.684, 2.105]; cap 1.2: 2.105 capped, the rest * (4 - 1.2)/1.895 -> 2.49 > 1.2: capped
    # too; then the two smallest share 4 - 2.4 = 1.6 equally
    w = normalise_weights(torch.tensor([0.0, 0.0, 4.0, 5.0]), w_min=0.1, w_max=1.2)
    torch.testing.assert_close(w, torch.tensor([0.8, 0.8, 1.2, 1.2]))
    assert torch.equal(normalise_weights(torch.tensor([0.0, 1.0, 3.0]), w_max=1.0), torch.ones(3))
    with pytest.raises(ValueError, match=r"w_max=0\.5.*>= 1"):
        normalise_weights(torch.ones(3), w_max=0.5)


def test_weighted_cross_entropy_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([1, 0])
    # CE = [ln 2, -ln(3/4)]; mean of w * CE with w = [2, .5]
    expected = (2 * math.log(2) + 0.5 * math.log(4 / 3)) / 2
    assert weighted_cross_entropy(logits, y, torch.tensor([2.0, 0.5])).item() == pytest.approx(expected)
    torch.testing.assert_close(weighted_cross_entropy(logits, y, torch.ones(2)), F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match=r"\[2\]"):
        weighted_cross_entropy(logits, y, torch.ones(3))


# ---------------------------------------------------------------- consistency end to end
def test_eps_zero_gives_identical_maps_and_plain_weights(trained):
    x, y, _ = colour_squares(6, seed=1)
    res = consistency_weights(trained, x, y, eps=0.0)
    assert torch.equal(res.x_adv, x)
    assert torch.equal(res.E, torch.ones(6)) and torch.equal(res.v, torch.zeros(6))
    assert torch.equal(res.w, torch.ones(6))


def test_the_unperturbed_sample_gets_the_floor_weight(trained):
    x, y, _ = colour_squares(6, seed=1)
    eps = torch.tensor([0.0] + [0.1] * 5)  # sample 0 is not attacked: E = 1, v = 0
    res = consistency_weights(trained, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    assert res.E[0] == 1.0 and (res.E[1:] < 1).all()
    floored = (res.v / res.v.mean()).clamp_min(0.1)
    assert res.w[0].item() == pytest.approx(0.1 / floored.mean().item())  # w_min, renormalised
    assert res.w[0] == res.w.min()
    assert res.w.mean().item() == pytest.approx(1.0)


def test_ground_truth_background_leaves_foreground_bytes_unchanged(trained):
    x, y, mask = colour_squares(6, seed=1)
    res = explanation_consistency(trained, x, y, mask_source="ground_truth", object_mask=mask, eps=0.1,
                                  generator=torch.Generator().manual_seed(0))
    fg = mask[:, None].expand_as(x)
    assert torch.equal(res.background[:, 0], ~mask)
    assert torch.equal(res.x_adv[fg], x[fg])
    assert (res.x_adv[~fg] != x[~fg]).float().mean() > 0.9


@pytest.mark.parametrize("similarity", ["cosine", "pearson", "js"])
def test_cam_source_outputs_are_consistent(trained, similarity):
    x, y, _ = colour_squares(4, seed=2)
    modes = [m.training for m in trained.modules()]
    res = explanation_consistency(trained, x, y, tau=0.4, eps=0.1, similarity=similarity,
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.cam, norm01(explain(trained, x, y, method="gradcam")))
    torch.testing.assert_close(res.cam_adv, norm01(explain(trained, res.x_adv, y, method="gradcam")))
    assert torch.equal(res.background[:, 0], res.cam < 0.4)
    torch.testing.assert_close(res.E, map_similarity(res.cam, res.cam_adv, similarity))
    torch.testing.assert_close(res.v, 1 - res.E)
    assert res.w is None
    assert [m.training for m in trained.modules()] == modes
    assert all(p.grad is None for p in trained.parameters())


# ---------------------------------------------------------------- SCAAT
def _bn_batch(seed=3):
    x, y, _ = colour_squares(6, seed=seed)
    return x, y


def test_scaat_perturbs_only_the_low_saliency_region():
    model = BNNet().train()
    before = copy.deepcopy(model).eval()  # the loss forwards then update the BN statistics
    x, y = _bn_batch()
    res = scaat_loss(model, x, y, keep=0.3, generator=torch.Generator().manual_seed(0))
    outside = ~res.region.expand_as(x)
    assert torch.equal(res.x_adv[outside], x[outside])
    assert (res.x_adv != x).any()
    assert ((res.x_adv - x).abs().flatten(1).amax(1) <= res.eps_i + 1e-6).all()
    # the region is the 30% of pixels with the lowest saliency (eval-mode saliency of the true class)
    sal = explain(before, x, y, method="saliency")
    torch.testing.assert_close(res.saliency, sal)
    assert (res.region.flatten(1).sum(1) == round(0.3 * 144)).all()  # 43 of 144 pixels
    assert (res.saliency.flatten(1).unique(dim=1).shape[1] == 144)  # no ties here, so ...
    q = torch.quantile(res.saliency.flatten(1), 0.3, dim=1)
    assert torch.equal(res.region[:, 0], res.saliency < q[:, None, None])  # ... the quantile rule
    inside_max = torch.where(res.region[:, 0], res.saliency, 0).flatten(1).amax(1)
    outside_min = torch.where(res.region[:, 0], float("inf"), res.saliency).flatten(1).amin(1)
    assert (inside_max < outside_min).all()


def test_scaat_backward_reaches_every_parameter():
    model = BNNet().train()
    x, y = _bn_batch()
    res = scaat_loss(model, x, y, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())  # the attack left no gradients behind
    assert res.loss.dim() == 0 and res.kl > 0
    res.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_scaat_budget_follows_confidence_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.full((48,), 1 / 16), torch.zeros(48)]))
    # logits [3, 0] (all ones) and [1.5, 0] (all .5): p(class 0) = sigmoid(3), sigmoid(1.5)
    x = torch.stack([torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.5), torch.ones(3, 4, 4)])
    y = torch.tensor([0, 0, 1])
    conf = torch.sigmoid(torch.tensor([3.0, 1.5, -3.0]))
    res = scaat_loss(model, x, y, eps=0.1, eps_min=0.01, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eps_i, 0.1 * (1 - conf) + 0.01)
    assert res.eps_i[0] < res.eps_i[1] < res.eps_i[2]  # more confident -> smaller budget
    # constant saliency: every pixel ties, the region still holds keep = half of the pixels
    assert (res.region.flatten(1).sum(1) == 8).all()


def test_scaat_lam_zero_is_plain_cross_entropy():
    model = BNNet().train()
    ref = copy.deepcopy(model)
    x, y = _bn_batch()
    res = scaat_loss(model, x, y, lam=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.loss.detach(), res.ce)
    torch.testing.assert_close(res.ce, F.cross_entropy(ref(x), y))  # the train-mode forward of x


def test_scaat_eval_attack_mode_restores_modes_and_keeps_bn_statistics():
    model = BNNet().train()
    model.fc.eval()  # a mixed state is restored module by module
    modes = [m.training for m in model.modules()]
    ref = copy.deepcopy(model)
    x, y = _bn_batch()
    res = scaat_loss(model, x, y, attack_mode="eval", generator=torch.Generator().manual_seed(0))
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():  # the only statistics updates: the two loss forwards, x then x_adv
        ref(x)
        ref(res.x_adv)
    assert model.bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=0, atol=1e-7)
    # "current": the saliency pass and 3 attack forwards also update them (1 + 3 + 2)
    cur = BNNet().train()
    scaat_loss(cur, x, y, attack_mode="current", generator=torch.Generator().manual_seed(0))
    assert cur.bn.num_batches_tracked.item() == 6 and cur.training
    # the mode is restored also when the call raises
    with pytest.raises(ValueError, match="target 7"):
        scaat_loss(model, x, torch.tensor([0, 1, 2, 7, 0, 1]))
    assert [m.training for m in model.modules()] == modes


def test_scaat_validation():
    model = BNNet()
    x, y = _bn_batch()
    for kwargs, pat in [({"keep": 0.0}, r"keep=0\.0.*\(0, 1\)"), ({"keep": 1.0}, r"keep=1\.0"),
                        ({"eps": -0.1}, r"eps=-0\.1"), ({"eps_min": -1}, r"eps_min=-1"),
                        ({"lam": -0.5}, r"lam=-0\.5"), ({"steps": 0}, r"steps=0"),
                        ({"attack_mode": "train"}, r"'train'.*eval, current")]:
        with pytest.raises(ValueError, match=pat):
            scaat_loss(model, x, y, **kwargs)


def test_degenerate_weights_by_hand():
    """v = 0.5, 1.5, 1.0, 1.0 with the last two flagged; power 1, no floor: keep/legacy normalise all four
    (0.5, 1.5, 1, 1); one: the first two among themselves (0.5, 1.5) and 1 for the flagged; exclude: the
    flagged 0 and the others scaled to a mean of 1 over all four (1, 3, 0, 0)."""
    from xai_core.objectives import degenerate_weights

    v, flag = torch.tensor([0.5, 1.5, 1.0, 1.0]), torch.tensor([False, False, True, True])
    for how in ("legacy", "keep"):
        torch.testing.assert_close(degenerate_weights(v, flag, how, w_min=0.0), torch.tensor([0.5, 1.5, 1.0, 1.0]))
    torch.testing.assert_close(degenerate_weights(v, flag, "one", w_min=0.0), torch.tensor([0.5, 1.5, 1.0, 1.0]))
    v2 = torch.tensor([1.0, 3.0, 9.0, 9.0])
    torch.testing.assert_close(degenerate_weights(v2, flag, "one", w_min=0.0), torch.tensor([0.5, 1.5, 1.0, 1.0]))
    torch.testing.assert_close(degenerate_weights(v2, flag, "exclude", w_min=0.0), torch.tensor([1.0, 3.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="degenerate='drop': allowed values are legacy, keep, one, exclude"):
        degenerate_weights(v, flag, "drop")


def test_a_flat_clean_map_is_flagged_and_not_attacked_unless_legacy():
    """Image 0 is all zero: every activation is relu(bias), Grad-CAM is constant, norm01 makes it 0. Legacy
    attacks its whole image (background everywhere); keep leaves it alone (x_adv = x); both flag it."""
    from xai_core.objectives import explanation_consistency

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(2, 3, 8, 8)
    x[0] = 0
    kw = {"layers": ["1"], "eps": 0.1, "step_size": 0.05, "steps": 2}
    legacy = explanation_consistency(model, x, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), **kw)
    keep = explanation_consistency(model, x, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0),
                                   degenerate="keep", **kw)
    assert legacy.degenerate[0] and keep.degenerate[0] and not keep.degenerate[1]
    assert legacy.background[0].all() and not keep.background[0].any()
    assert torch.equal(keep.x_adv[0], x[0]) and not torch.equal(legacy.x_adv[0], x[0])
    torch.testing.assert_close(keep.background[1], legacy.background[1])
