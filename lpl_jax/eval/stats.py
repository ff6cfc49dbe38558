"""Statistics of a paired multi-seed comparison of training variants, and bootstrap intervals of one run's metrics.

Each variant is trained with the same N seeds (N small, 3-10), seed i paired across variants: a comparison looks at
the N per-seed differences `variant - baseline`, in which the seed-to-seed variation they share cancels. Means,
standard errors and t statistics are computed here, scipy.stats gives only the t quantile and survival functions;
the tests check them against scipy's own `t.interval`/`sem`, `ttest_rel` (statistic, p-value, `confidence_interval`)
and `bootstrap(method='percentile')`, and the intervals' coverage by Monte Carlo.

References:
  Student, 1908, The probable error of a mean (the t interval and the paired t-test).
  Efron & Tibshirani, 1993, An introduction to the bootstrap, ch. 13 (the percentile interval).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.stats

from lpl_jax.eval.fid import feature_statistics, frechet_distance


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean and its two-sided confidence interval."""

  mean: float
  low: float
  high: float
  n: int
  level: float

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2

  def contains(self, x: float) -> bool:
    """`low <= x <= high` (False for the NaN interval of one value)."""
    return bool(self.low <= x <= self.high)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _check_level(level: float) -> None:
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must be in (0, 1), e.g. 0.95; got {level}.')


def _as_values(name: str, values) -> np.ndarray:
  """1-D float64 array of finite values, else ValueError naming the problem."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f'{name} must be a non-empty 1-D sequence (one value per seed); got shape {x.shape}.')
  bad = np.count_nonzero(~np.isfinite(x))
  if bad:
    raise ValueError(f'{name} has {bad} non-finite (NaN or infinite) values of {x.size}: {x.tolist()}.')
  return x


def _mean_and_sem(x: np.ndarray) -> tuple[float, float]:
  """Mean and standard error `sd(ddof=1) / sqrt(n)`; exactly `(x[0], 0)` when all values are equal."""
  n = x.size
  if np.all(x == x[0]):
    return float(x[0]), 0.0
  mean = x.sum() / n
  sd = np.sqrt(np.sum((x - mean) ** 2) / (n - 1))
  return float(mean), float(sd / np.sqrt(n))


def mean_interval(values, level: float = 0.95) -> Interval:
  """Student's t interval of the mean over seeds: `mean +- t_{(1+level)/2, n-1} * sd(ddof=1) / sqrt(n)`.

  With one value (`n == 1`) `low` and `high` are NaN: one seed says nothing about the spread. Equal values give
  an interval collapsed to their value.

  Raises:
    ValueError: empty or not 1-D values, a NaN or infinite value, or `level` outside (0, 1).
  """
  _check_level(level)
  x = _as_values('values', values)
  n = x.size
  if n == 1:
    return Interval(float(x[0]), float('nan'), float('nan'), 1, level)
  mean, sem = _mean_and_sem(x)
  q = float(scipy.stats.t.ppf((1 + level) / 2, n - 1))
  return Interval(mean, mean - q * sem, mean + q * sem, n, level)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """`variant - baseline` over paired seeds."""

  interval: Interval  # of the per-seed differences
  t_statistic: float
  p_value: float  # two-sided paired t-test (H0: mean difference 0)
  distinguishable: bool  # the interval excludes 0 (equivalently p < 1 - level)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)  # the interval nested as its own dict


def paired_difference(variant, baseline, level: float = 0.95) -> PairedDifference:
  """Paired t-test and Student's t interval of the mean per-seed difference `variant[i] - baseline[i]`.

  `t = mean(d) / (sd(d, ddof=1) / sqrt(n))`, `p = 2 * P(T_{n-1} > |t|)`. `distinguishable` is read off the
  interval (it excludes 0), which is the same as `p < 1 - level` up to rounding at the boundary.

  All differences exactly equal (sd 0): if they are 0, `t = 0`, `p = 1` and the interval is [0, 0] (not
  distinguishable); otherwise `t = +-inf`, `p = 0` and the interval collapses to the difference (distinguishable).

  Args:
    variant: `[n]` metric of the variant, one value per seed.
    baseline: `[n]` metric of the baseline, seed i paired with `variant[i]`.
    level: confidence level of the interval, e.g. 0.95.

  Raises:
    ValueError: lengths differ, `n < 2`, a NaN or infinite value, or `level` outside (0, 1).
  """
  _check_level(level)
  v, b = np.asarray(variant, np.float64), np.asarray(baseline, np.float64)
  if v.ndim != 1 or b.ndim != 1 or v.shape != b.shape or v.size < 2:
    raise ValueError(
      f'a paired comparison needs two 1-D sequences of the same length n >= 2 (seed i paired); got variant of '
      f'shape {v.shape} and baseline of shape {b.shape}.'
    )
  _as_values('variant', v)
  _as_values('baseline', b)
  d = v - b
  interval = mean_interval(d, level)
  mean, sem = _mean_and_sem(d)
  if sem == 0.0:
    t = 0.0 if mean == 0.0 else float(np.copysign(np.inf, mean))
  else:
    t = mean / sem
  p = float(min(1.0, 2.0 * scipy.stats.t.sf(abs(t), d.size - 1)))
  return PairedDifference(interval, t, p, bool(interval.low > 0.0 or interval.high < 0.0))


def bootstrap_interval(
  statistic: Callable[[np.ndarray], float], data, *, num_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float, np.ndarray]:
  """Percentile bootstrap interval of `statistic` over the rows (axis 0) of `data` (`[n, ...]`).

  Resample r is `statistic(data[idx])` with `idx = rng.integers(0, n, n)`, `rng = np.random.default_rng(seed)`,
  drawn in order; the interval is the `(1 - level) / 2` and `(1 + level) / 2` quantiles of the resampled values
  (`np.quantile`, linear interpolation).

  Returns:
    `(statistic(data), low, high, resampled values [num_resamples])`.
  """
  _check_level(level)
  data = np.asarray(data)
  if data.ndim == 0 or data.shape[0] < 2:
    raise ValueError(f'bootstrap needs data of at least 2 rows ([n, ...]); got shape {data.shape}.')
  if num_resamples < 2:
    raise ValueError(f'num_resamples must be >= 2; got {num_resamples}.')
  n = data.shape[0]
  value = float(statistic(data))
  rng = np.random.default_rng(seed)
  resampled = np.array([float(statistic(data[rng.integers(0, n, n)])) for _ in range(num_resamples)])
  low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
  return value, float(low), float(high), resampled


def bootstrap_frechet(
  features, mu, sigma, *, num_resamples: int = 200, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
  """Within-run uncertainty of a Frechet distance: percentile bootstrap over the generated features' rows.

  Each resample recomputes `feature_statistics` of the resampled `[N, D]` features and their `frechet_distance`
  to the fixed reference statistics `(mu, sigma)` (the reference's own sampling error is not included). A resample
  repeats rows, so its covariance is noisier and the bootstrap distribution of the distance is biased upward: the
  value usually sits near its low end. The interval therefore measures spread, and the report uses `std`.

  Returns:
    `{'value': FD of all features, 'low', 'high': the percentile interval, 'std': sd (ddof=1) of the resamples}`.
  """
  statistic = lambda f: frechet_distance(*feature_statistics(f), mu, sigma)
  features = np.asarray(features, np.float64)
  value, low, high, resampled = bootstrap_interval(
    statistic, features, num_resamples=num_resamples, level=level, seed=seed
  )
  return dict(value=value, low=low, high=high, std=float(np.std(resampled, ddof=1)))


def describe(p: PairedDifference, metric: str, *, lower_is_better: bool, unit: str = '') -> str:
  """One sentence for a report: direction and size of `variant - baseline`, its interval, p, and the verdict.

  E.g. "frechet distance: the variant is lower by 2.31 (95% interval 0.52 to 4.10, p = 0.03, 3 seeds):
  distinguishable from zero at 95%, in the variant's favour." The interval is of the stated difference (for "lower
  by", of `baseline - variant`); numbers keep 3 significant digits of the largest of them.
  """
  iv = p.interval
  pct = f'{round(iv.level * 100, 6):g}%'
  sign = -1.0 if iv.mean < 0 else 1.0
  size, low, high = abs(iv.mean), *sorted((sign * iv.low, sign * iv.high))
  largest = max(abs(size), abs(low), abs(high))
  decimals = 2 if largest == 0 else int(min(12, max(0, 2 - np.floor(np.log10(largest)))))
  u = f' {unit}' if unit else ''
  _fmt = lambda x, decimals: f'{x:.{decimals}f}'
  if iv.mean == 0:
    head = f'{metric}: the variant equals the baseline on average'
  else:
    head = f'{metric}: the variant is {"lower" if sign < 0 else "higher"} by {_fmt(size, decimals)}{u}'
  detail = f'{pct} interval {_fmt(low, decimals)} to {_fmt(high, decimals)}{u}, p = {p.p_value:.2g}, {iv.n} seeds'
  if not p.distinguishable:
    return f'{head} ({detail}): not distinguishable from zero at {pct} (the interval includes 0).'
  favour = 'variant' if (sign < 0) == lower_is_better else 'baseline'
  return f"{head} ({detail}): distinguishable from zero at {pct}, in the {favour}'s favour."
