"""Seed statistics against scipy.stats' own t.interval, sem, ttest_rel and bootstrap; coverage by Monte Carlo."""

import numpy as np
import pytest
import scipy.stats

from lpl_jax.eval.fid import feature_statistics, frechet_distance
from lpl_jax.eval.stats import (
  Interval,
  PairedDifference,
  bootstrap_frechet,
  bootstrap_interval,
  describe,
  mean_interval,
  paired_difference,
)

LEVELS = (0.9, 0.95, 0.99)


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('n', (2, 3, 5, 10))
def test_mean_interval_matches_scipy_t_interval(n, level):
  x = np.random.default_rng(n).normal(1.5, 0.7, size=n)
  got = mean_interval(x, level)
  low, high = scipy.stats.t.interval(level, n - 1, loc=np.mean(x), scale=scipy.stats.sem(x))
  np.testing.assert_allclose([got.mean, got.low, got.high], [np.mean(x), low, high], rtol=0, atol=1e-12)
  assert (got.n, got.level) == (n, level)
  assert got.half_width == pytest.approx((high - low) / 2, abs=1e-12)
  assert got.contains(got.mean) and not got.contains(high + 1e-6)


def test_mean_interval_one_value_and_equal_values():
  one = mean_interval([2.5])
  assert one.mean == 2.5 and np.isnan(one.low) and np.isnan(one.high) and one.n == 1
  assert not one.contains(2.5)
  assert mean_interval([0.1, 0.1, 0.1]) == Interval(0.1, 0.1, 0.1, 3, 0.95)
  half = 12.706204736174698 * 0.5  # t_{0.975, 1} * sd([1, 2]) / sqrt(2)
  expected = dict(mean=1.5, low=pytest.approx(1.5 - half), high=pytest.approx(1.5 + half), n=2, level=0.95)
  assert mean_interval([1.0, 2.0]).to_dict() == expected


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('n', (2, 3, 5, 10))
def test_paired_difference_matches_scipy_ttest_rel(n, level):
  rng = np.random.default_rng(100 + n)
  seed_effect = rng.normal(0.0, 2.0, size=n)
  baseline = 10.0 + seed_effect + rng.normal(0.0, 0.3, size=n)
  variant = 9.8 + seed_effect + rng.normal(0.0, 0.3, size=n)
  got = paired_difference(variant, baseline, level)
  ref = scipy.stats.ttest_rel(variant, baseline)
  ci = ref.confidence_interval(level)
  np.testing.assert_allclose([got.t_statistic, got.p_value], [ref.statistic, ref.pvalue], rtol=0, atol=1e-12)
  np.testing.assert_allclose([got.interval.low, got.interval.high], [ci.low, ci.high], rtol=0, atol=1e-12)
  assert got.interval.mean == pytest.approx(np.mean(variant - baseline), abs=1e-12)
  assert got.distinguishable == (got.p_value < 1 - level) == (not got.interval.contains(0.0))


def test_pairing_cancels_the_shared_seed_effect():
  """A consistent 0.5 improvement under a seed-to-seed spread of 3: invisible unpaired, clear paired."""
  seed_effect = np.array([-3.0, 0.5, 2.0, 4.0, -1.5])
  baseline = 20.0 + seed_effect
  variant = baseline - 0.5 + np.array([0.05, -0.05, 0.02, 0.0, -0.02])
  assert mean_interval(variant).contains(mean_interval(baseline).mean)
  diff = paired_difference(variant, baseline)
  assert diff.distinguishable and diff.interval.high < 0 and diff.p_value < 1e-4


def test_paired_difference_zero_spread():
  same = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
  assert (same.t_statistic, same.p_value, same.distinguishable) == (0.0, 1.0, False)
  assert (same.interval.low, same.interval.high) == (0.0, 0.0)
  shifted = paired_difference([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
  assert (shifted.t_statistic, shifted.p_value, shifted.distinguishable) == (np.inf, 0.0, True)
  assert shifted.interval == Interval(0.5, 0.5, 0.5, 3, 0.95)
  assert paired_difference([0.5, 1.5], [1.0, 2.0]).t_statistic == -np.inf
  assert shifted.to_dict() == dict(
    interval=shifted.interval.to_dict(), t_statistic=np.inf, p_value=0.0, distinguishable=True
  )


def test_coverage_and_null_rejection_rate():
  """4000 draws of 4 seeds: the 95% interval covers the true mean, and a true null is rejected, at their rates."""
  rng = np.random.default_rng(0)
  draws = rng.normal(3.0, 2.0, size=(4000, 4))
  covered = np.mean([mean_interval(x).contains(3.0) for x in draws])
  assert abs(covered - 0.95) < 0.015, covered
  seed_effect = rng.normal(0.0, 5.0, size=(4000, 4))
  pairs = [paired_difference(7.0 + s + rng.normal(0, 1, 4), 7.0 + s + rng.normal(0, 1, 4)) for s in seed_effect]
  rejected = np.mean([p.distinguishable for p in pairs])
  assert abs(rejected - 0.05) < 0.015, rejected
  assert all(p.distinguishable == (p.p_value < 0.05) for p in pairs)


@pytest.mark.parametrize('level', (0.9, 0.95))
def test_bootstrap_interval_matches_scipy_percentile_bootstrap(level):
  x = np.random.default_rng(1).exponential(2.0, size=200)
  value, low, high, resampled = bootstrap_interval(np.mean, x, num_resamples=20000, level=level, seed=2)
  ref = scipy.stats.bootstrap(
    (x,), np.mean, method='percentile', confidence_level=level, n_resamples=20000, rng=np.random.default_rng(3)
  )
  assert value == np.mean(x) and resampled.shape == (20000,)
  # Monte Carlo error of each end: ~0.002 sd with 20000 resamples on each side.
  tol = 0.01 * np.std(x)
  assert abs(low - ref.confidence_interval.low) < tol, (low, ref.confidence_interval)
  assert abs(high - ref.confidence_interval.high) < tol, (high, ref.confidence_interval)


def test_bootstrap_interval_resamples_rows_as_documented():
  data = np.random.default_rng(4).normal(size=(30, 3))
  statistic = lambda d: float(np.median(d[:, 0]) + d[:, 1:].sum())
  value, low, high, resampled = bootstrap_interval(statistic, data, num_resamples=50, level=0.8, seed=7)
  rng = np.random.default_rng(7)
  expected = np.array([statistic(data[rng.integers(0, 30, 30)]) for _ in range(50)])
  np.testing.assert_array_equal(resampled, expected)
  assert value == statistic(data)
  assert (low, high) == tuple(np.quantile(expected, [0.1, 0.9]))


def _gaussian_features(seed, n):
  """`N(m, diag(s^2))` in 4-d; its Frechet distance to N(0, I) is |m|^2 + sum (s - 1)^2 = 1 + 0.5."""
  m, s = np.full(4, 0.5), np.array([1.0, 1.5, 1.0, 0.5])
  return m + s * np.random.default_rng(seed).normal(size=(n, 4))


def test_bootstrap_frechet():
  mu, sigma, true_fd = np.zeros(4), np.eye(4), 1.5
  small = bootstrap_frechet(_gaussian_features(5, 400), mu, sigma, seed=1)
  features = _gaussian_features(6, 1600)
  large = bootstrap_frechet(features, mu, sigma, seed=1)
  assert large['value'] == frechet_distance(*feature_statistics(features), mu, sigma)
  for r in (small, large):
    assert r['low'] < r['value'] < r['high'] and r['std'] > 0
    assert abs(r['value'] - true_fd) < 4 * r['std'], r
  assert 0.35 < large['std'] / small['std'] < 0.75, (small, large)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r'variant of shape \(3,\) and baseline of shape \(4,\)'):
    paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
  with pytest.raises(ValueError, match=r'n >= 2.*variant of shape \(1,\) and baseline of shape \(1,\)'):
    paired_difference([1.0], [2.0])
  with pytest.raises(ValueError, match='baseline has 1 non-finite'):
    paired_difference([1.0, 2.0], [1.0, np.nan])
  with pytest.raises(ValueError, match='values has 2 non-finite'):
    mean_interval([1.0, np.inf, np.nan])
  with pytest.raises(ValueError, match='non-empty'):
    mean_interval([])
  with pytest.raises(ValueError, match='level must be in'):
    mean_interval([1.0, 2.0], level=95)
  with pytest.raises(ValueError, match='at least 2 rows'):
    bootstrap_interval(np.mean, [1.0])


def test_describe():
  example = PairedDifference(Interval(-2.31, -4.10, -0.52, 3, 0.95), -5.5, 0.03, True)
  assert describe(example, 'frechet distance', lower_is_better=True) == (
    'frechet distance: the variant is lower by 2.31 (95% interval 0.52 to 4.10, p = 0.03, 3 seeds): '
    "distinguishable from zero at 95%, in the variant's favour."
  )
  better = paired_difference([8.0, 9.5, 12.0], [10.0, 12.0, 14.0], level=0.9)
  text = describe(better, 'recall', lower_is_better=False, unit='points')
  assert text.startswith('recall: the variant is lower by 2.17 points (90% interval ')
  assert text.endswith(", 3 seeds): distinguishable from zero at 90%, in the baseline's favour.")
  unclear = paired_difference([1.0, 3.0, 2.5, 2.0], [0.0, 3.5, 1.0, 2.0])
  assert unclear.interval.mean > 0
  text = describe(unclear, 'fid', lower_is_better=True)
  assert text.startswith('fid: the variant is higher by 0.50 (95% interval -0.95 to 1.95, p = 0.35, 4 seeds)')
  assert text.endswith('4 seeds): not distinguishable from zero at 95% (the interval includes 0).')
  two = paired_difference([0.001, 0.0013], [0.0, 0.0003])
  assert describe(two, 'precision', lower_is_better=False).endswith(
    "2 seeds): distinguishable from zero at 95%, in the variant's favour."
  )
