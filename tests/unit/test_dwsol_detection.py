"""D-WSOL (METHODS §3a) and adversarial detection from maps (METHODS §3b): hand-computed values."""

import math

import pytest
import torch

from tests.unit._models import TinyCNN
from xai_core.attribution import explain
from xai_core.metrics.detection import (
    DetectorCNN,
    adversarial_examples,
    auroc,
    detection_auroc,
    detection_cv,
    detector_scores,
    train_detector,
)
from xai_core.metrics.dwsol import default_absent, dwsol

torch.set_num_threads(2)


def _fixed_maps():
    """Three 6x6 samples; object a = columns 0-1, object b = columns 4-5; maps per (sample, class)."""
    maps = torch.zeros(3, 4, 6, 6)
    # sample 0: a=0, b=1, absent (default) = 2
    maps[0, 0, 2, 1] = 1.0   # peak inside a -> hit_a
    maps[0, 0, 0, 3] = -3.0  # negative: no relu mass
    maps[0, 0, 5, 3] = 0.5   # relu mass of map_a = 1.5
    maps[0, 1, 3, 0] = 2.0   # query b points into a, 4 px from b -> miss
    maps[0, 2, 1, 0] = 0.3   # absent class: 0.3 in a, 0.6 in b, 0.9 outside, -1 in a
    maps[0, 2, 1, 5] = 0.6
    maps[0, 2, 2, 2] = 0.9
    maps[0, 2, 0, 0] = -1.0  # -> false response (0.3 + 0.6) / 1.5 = 0.6
    maps[0, 3, 2, 0] = 0.75  # class 3 (explicit absent): 0.75 / 1.5 = 0.5
    # sample 1: a=2, b=0, absent (default) = 1
    maps[1, 2, 0, 4] = 1.0   # peak inside b, within 3 px of a: still a miss (inside b)
    maps[1, 0, 4, 2] = 1.0   # query b: 2 px from b, not in a -> hit with tolerance 3
    # class 1 map all zeros -> false response 0; class 3 map all zeros too
    # sample 2: a=1, b=2, absent (default) = 0
    maps[2, 1] = -1.0
    maps[2, 1, 3, 4] = 0.0   # argmax inside b -> miss; no relu mass at all
    maps[2, 2, 3, 5] = 5.0   # hit_b
    maps[2, 0, 0, 0] = 1.0   # mass inside a over a map_a without mass -> NaN
    maps[2, 3, 0, 0] = 1.0
    mask_a = torch.zeros(3, 6, 6, dtype=torch.bool)
    mask_a[:, :, :2] = True
    mask_b = torch.zeros(3, 6, 6, dtype=torch.bool)
    mask_b[:, :, 4:] = True
    return maps, torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2]), mask_a, mask_b


def test_dwsol_hand_computed():
    maps, la, lb, ma, mb = _fixed_maps()
    calls = []

    def explain_fn(model, x, t):
        calls.append(t.clone())
        return maps[torch.arange(3), t]

    x = torch.zeros(3, 3, 6, 6)
    out = dwsol(None, x, la, lb, ma, mb, explain_fn, tolerance=3)
    assert torch.equal(calls[2], torch.tensor([2, 1, 0]))  # default absent class
    torch.testing.assert_close(out["hit_a"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["hit_b"], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(out["accuracy"], torch.tensor([0.5, 0.5, 0.5]))
    fr = out["false_response"]
    torch.testing.assert_close(fr[:2], torch.tensor([0.6, 0.0]))
    assert math.isnan(fr[2])
    # tolerance 0: sample 1's query b (2 px from b) is no longer a hit
    assert dwsol(None, x, la, lb, ma, mb, explain_fn, tolerance=0)["hit_b"][1] == 0
    # explicit absent class 3
    out3 = dwsol(None, x, la, lb, ma, mb, explain_fn, absent=torch.tensor([3, 3, 3]), tolerance=3)
    torch.testing.assert_close(out3["false_response"][:2], torch.tensor([0.5, 0.0]))
    assert math.isnan(out3["false_response"][2])


def test_dwsol_argument_checks():
    maps, la, lb, ma, mb = _fixed_maps()
    fn = lambda model, x, t: maps[torch.arange(3), t]  # noqa: E731
    x = torch.zeros(3, 3, 6, 6)
    with pytest.raises(ValueError, match="absent must differ"):
        dwsol(None, x, la, lb, ma, mb, fn, absent=la)
    with pytest.raises(ValueError, match="must differ in every sample"):
        dwsol(None, x, la, la, ma, mb, fn)
    with pytest.raises(ValueError, match="mask_b must have shape"):
        dwsol(None, x, la, lb, ma, mb[:, :5], fn)
    torch.testing.assert_close(default_absent(torch.tensor([0, 1, 2, 5]), torch.tensor([1, 0, 0, 4])),
                               torch.tensor([2, 2, 1, 0]))


def test_auroc_hand_examples():
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.ones(6), torch.tensor([0, 1, 0, 1, 0, 1])) == 0.5
    # pairs (pos, neg): (2,1)=1, (2,2)=0.5, (3,1)=1, (3,2)=1 -> 3.5 / 4
    assert auroc(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0, 1, 0, 1])) == 0.875
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.ones(3), torch.ones(3))


def test_auroc_matches_sklearn_or_pairs():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (200,), generator=g)
    try:
        from sklearn.metrics import roc_auc_score
        ref = float(roc_auc_score(y.numpy(), s.numpy()))
    except ImportError:  # the definition: P(score_pos > score_neg) + 0.5 P(tie), over all pairs
        d = s[y == 1][:, None] - s[y == 0][None, :]
        ref = float(((d > 0).double() + 0.5 * (d == 0).double()).mean())
    assert auroc(s, y) == pytest.approx(ref, abs=1e-12)


def _separable_maps(n, size=16, seed=0):
    """Clean: one smooth central blob; adversarial: scattered noise (trivially separable)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 4 + size / 2 - 2
    blob = torch.exp(-((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2) / 8.0)
    noise = torch.rand(n, size, size, generator=g)
    return torch.cat([blob, noise]), torch.cat([torch.zeros(n), torch.ones(n)]).long()


def test_train_detector_separates_separable_maps():
    maps, labels = _separable_maps(48)
    state = torch.get_rng_state()
    det = train_detector(maps, labels, epochs=8, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # seeded privately: global RNG untouched
    assert isinstance(det, DetectorCNN) and not det.training
    test_maps, test_labels = _separable_maps(32, seed=1)
    assert auroc(detector_scores(det, test_maps), test_labels) > 0.9
    again = train_detector(maps, labels, epochs=8, seed=0)  # same seed -> same detector
    torch.testing.assert_close(detector_scores(again, test_maps), detector_scores(det, test_maps))


def test_adversarial_examples_within_budget():
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    adv = adversarial_examples(model, x, y, eps=4 / 255, steps=3, generator=torch.Generator().manual_seed(1))
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_detection_auroc_end_to_end():
    model = TinyCNN().eval()
    g = torch.Generator().manual_seed(0)
    # Clean pixels on a grid of quarters; any perturbation leaves it, so |x - grid| is a perfect detector map.
    x = torch.randint(1, 4, (16, 3, 16, 16), generator=g).float() / 4
    y = torch.randint(0, 4, (16,), generator=g)

    def off_grid(m, xx, t):
        return (xx - (xx * 4).round() / 4).abs().sum(1)

    out = detection_auroc(model, x, y, off_grid, eps=8 / 255, steps=2, epochs=20, seed=0)
    assert out["n_train"] == 16 and out["n_test"] == 16
    assert 0.0 <= out["attack_success"] <= 1.0
    assert out["auroc"] > 0.9
    sal = detection_auroc(model, x, y, lambda m, xx, t: explain(m, xx, t, method="saliency"),
                          steps=2, epochs=2, train_fraction=0.25, seed=1)
    assert 0.0 <= sal["auroc"] <= 1.0 and sal["n_train"] == 8 and sal["n_test"] == 24


def test_detection_cv_uses_only_correct_images_the_attack_flips():
    """The images kept are those right when clean and wrong after the attack (recomputed here with the same
    seeded attack); the maps are asked for exactly those, clean ones for the true class and adversarial ones
    for the attacked prediction; an off-grid map separates them perfectly in every fold. (A linear model: the
    attack flips many of its decisions; a random TinyCNN's pooled logits barely move.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 4, (64, 3, 16, 16), generator=g).float() / 4
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 4  # a third misclassified when clean
    adv = adversarial_examples(model, x, y, eps=0.1, steps=5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pred_adv = model(adv).argmax(1)
    keep = (torch.arange(64) % 3 != 0) & (pred_adv != y)
    calls = []

    def off_grid(m, xx, t):
        calls.append((xx.clone(), t.clone()))
        return (xx - (xx * 4).round() / 4).abs().sum(1)

    out = detection_cv(model, x, y, off_grid, eps=0.1, steps=5, folds=3, epochs=20, seed=7, n_resamples=200)
    assert out["n_correct"] == 42 and out["n_images"] == int(keep.sum()) >= 3
    assert out["attack_success"] == pytest.approx(int(keep.sum()) / 42)
    (xc, tc), (xa, ta) = calls
    assert torch.equal(xc, x[keep]) and torch.equal(tc, y[keep])
    assert torch.equal(xa, adv[keep]) and torch.equal(ta, pred_adv[keep])
    assert out["auroc"] > 0.9 and out["low"] <= out["auroc"] <= out["high"] <= 1.0 and out["low"] < 1.0
    few = detection_cv(model, x[:4], y[:4], off_grid, steps=2, folds=5, n_resamples=10)
    assert math.isnan(few["auroc"]) and few["n_images"] < 5
    with pytest.raises(ValueError, match="folds=1"):
        detection_cv(model, x, y, off_grid, folds=1)
