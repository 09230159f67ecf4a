"""xai_core.stats: the paired bootstrap against scipy's and against an exactly enumerated case; every
verdict branch (lower-is-better included) and the printed line."""

import itertools

import numpy as np
import pytest

from xai_core import stats


def test_one_seed_ci_equals_scipy_percentile_bootstrap():
    """One seed: resampling images only, which is scipy.stats.bootstrap on the paired differences."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    a = rng.normal(0.6, 0.2, 300)
    b = a - rng.normal(0.03, 0.1, 300)  # paired: the difference has a far smaller spread than a or b
    res = stats.paired_difference(a, b, n_resamples=20000, seed=1)
    ref = bootstrap((a - b,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                    random_state=np.random.default_rng(2)).confidence_interval
    assert res.diff == pytest.approx(np.mean(a - b))
    # two independent Monte Carlo runs of the same interval: the ends agree to a small share of its width
    width = ref.high - ref.low
    assert res.low == pytest.approx(ref.low, abs=0.03 * width) and res.high == pytest.approx(ref.high, abs=0.03 * width)
    assert (res.n_seeds, res.n_items, res.verdict) == (1, 300, stats.SUPPORTED)


def test_seed_and_image_resampling_matches_the_enumerated_distribution():
    """2 seeds x 2 images: 4 seed draws x 4 image draws, equally likely; the resampled means must take each
    value with its exact probability."""
    d = np.array([[0.0, 1.0], [2.0, 4.0]])
    exact: dict[float, float] = {}
    for ss in itertools.product(range(2), repeat=2):
        for ii in itertools.product(range(2), repeat=2):
            m = round(float(np.mean([d[s, i] for s in ss for i in ii])), 6)
            exact[m] = exact.get(m, 0.0) + 1 / 16
    means = stats.bootstrap_means(d, n_resamples=40000, seed=0)
    values, counts = np.unique(np.round(means, 6), return_counts=True)
    assert set(values) == set(exact)
    for v, c in zip(values, counts):
        assert c / len(means) == pytest.approx(exact[v], abs=0.01), v


def test_a_constant_difference_has_a_zero_width_interval():
    b = np.linspace(0, 1, 50).reshape(2, 25)
    res = stats.paired_difference(b + 0.25, b)
    assert (res.diff, res.low, res.high) == pytest.approx((0.25, 0.25, 0.25))


def test_nan_cells_are_left_out_of_both():
    a, b = np.array([0.5, np.nan, 0.7, 0.9]), np.array([0.4, 0.3, np.nan, 0.6])
    res = stats.paired_difference(a, b, n_resamples=500)
    assert res.diff == pytest.approx(np.mean([0.1, 0.3])) and res.n_items == 2
    assert stats.paired_difference(np.array([np.nan]), np.array([1.0])).verdict == stats.NOT_MEASURED


@pytest.mark.parametrize("d, higher, want", [
    (+0.2, True, stats.SUPPORTED), (-0.2, True, stats.CONTRADICTED),
    (+0.2, False, stats.CONTRADICTED), (-0.2, False, stats.SUPPORTED),
])
def test_verdict_branches_on_clear_differences(d, higher, want):
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, (3, 100))
    a = b + d + rng.normal(0, 0.05, b.shape)
    res = stats.paired_difference(a, b, higher_is_better=higher)
    assert res.verdict == want and np.sign(res.diff) == np.sign(d)  # A minus B, whatever the direction
    assert (res.low > 0) == (d > 0) and (res.high < 0) == (d < 0)


def test_inconclusive_when_the_interval_holds_zero():
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, (3, 100))
    a = b + rng.normal(0, 0.3, b.shape)
    a -= (a - b).mean()  # mean difference exactly 0
    res = stats.paired_difference(a, b)
    assert res.low < 0 < res.high and res.verdict == stats.INCONCLUSIVE
    assert stats.paired_difference(a, b, higher_is_better=False).verdict == stats.INCONCLUSIVE


def test_verdict_rule_itself_and_the_printed_line():
    assert stats.verdict(0.01, 0.2) == stats.SUPPORTED and stats.verdict(-0.2, -0.01) == stats.CONTRADICTED
    assert stats.verdict(-0.2, -0.01, higher_is_better=False) == stats.SUPPORTED
    assert stats.verdict(0.0, 0.2) == stats.INCONCLUSIVE  # touching 0 does not exclude it
    assert stats.verdict(float("nan"), 0.2) == stats.NOT_MEASURED
    res = stats.Difference(-0.0123, -0.02, -0.004, 3, 500, 0.95, False, stats.SUPPORTED)
    assert res.text() == "-0.012 [95% CI -0.020, -0.004; 3 seed(s) x 500 images, lower is better] → supported"


def test_unpaired_shapes_are_refused():
    with pytest.raises(ValueError, match=r"paired cell for cell"):
        stats.paired_difference(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\[images\] or \[seeds, images\]"):
        stats.paired_difference(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_bootstrap_medians_match_the_enumerated_lower_weighted_median():
    """2 seeds x 2 images again: every equally likely draw's lower weighted median, computed by listing the
    drawn cells and taking the lower middle one."""
    d = np.array([[0.0, 1.0], [2.0, 4.0]])
    exact: dict[float, float] = {}
    for ss in itertools.product(range(2), repeat=2):
        for ii in itertools.product(range(2), repeat=2):
            cells = sorted(d[s, i] for s in ss for i in ii)
            m = cells[(len(cells) - 1) // 2]
            exact[m] = exact.get(m, 0.0) + 1 / 16
    meds = stats.bootstrap_medians(d, n_resamples=40000, seed=0)
    values, counts = np.unique(meds, return_counts=True)
    assert set(values) == set(exact)
    for v, c in zip(values, counts):
        assert c / len(meds) == pytest.approx(exact[v], abs=0.01), v


def test_median_statistic_resists_an_outlier():
    """One image's ratio explodes (a near-zero denominator): the mean difference flips sign, the median not."""
    b = np.full(60, 0.5)
    a = np.full(60, 0.3)
    a[0] = 100.0
    mean = stats.paired_difference(a, b, higher_is_better=False)
    med = stats.paired_difference(a, b, higher_is_better=False, statistic="median")
    assert mean.diff > 1 and med.diff == pytest.approx(-0.2)
    assert med.verdict == stats.SUPPORTED and med.high == pytest.approx(-0.2)
    assert med.text().endswith("lower is better, median of the paired differences] → supported")
    with pytest.raises(ValueError, match="statistic='mode'"):
        stats.paired_difference(a, b, statistic="mode")
