"""Precision/recall/density/coverage against a direct NumPy transcription of the definitions and the `prdc` package."""

import numpy as np
import prdc as prdc_package
import pytest

from lpl_jax import eval as lpl_eval

KEYS = ('precision', 'recall', 'density', 'coverage')


def numpy_prdc(real, fake, k):
  """The definitions of Naeem et al. with full float64 distance matrices and sorted rows (no top-k, no blocks)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  real_radii = np.sort(dist(real, real), axis=1)[:, k]  # index k of the sorted row: the self distance is index 0
  fake_radii = np.sort(dist(fake, fake), axis=1)[:, k]
  d = dist(real, fake)  # [N, M]
  inside_real = d < real_radii[:, None]
  return dict(
    precision=inside_real.any(axis=0).mean(),
    recall=(d < fake_radii[None, :]).any(axis=1).mean(),
    density=inside_real.sum(axis=0).mean() / k,
    coverage=(d.min(axis=1) < real_radii).mean(),
  )


def _sets(seed, n, m, d):
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(n, d)).astype(np.float32)
  fake = (1.3 * rng.normal(size=(m, d)) + 0.4).astype(np.float32)
  return real, fake


@pytest.mark.parametrize('k', [3, 5])
@pytest.mark.parametrize('n,m,block', [(300, 250, 64), (97, 131, 1024)])
def test_matches_numpy_definitions_and_prdc_package(k, n, m, block):
  real, fake = _sets(k + n, n, m, 16)
  ours = lpl_eval.prdc(real, fake, nearest_k=k, block_size=block)
  ref = numpy_prdc(real, fake, k)
  package = prdc_package.compute_prdc(real, fake, k)
  for key in KEYS:
    assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours[key] == pytest.approx(float(package[key]), abs=1e-12), key
  assert 0.0 < ours['precision'] < 1.0 and 0.0 < ours['recall'] < 1.0  # not a degenerate case


def test_large_offset_features_stay_exact():
  # Inception-like features: non-negative with a large common offset (cancellation in |x|^2 + |y|^2 - 2x.y).
  real, fake = _sets(7, 200, 200, 64)
  real, fake = np.abs(real) * 3.0 + 20.0, np.abs(fake) * 3.0 + 20.0
  ours = lpl_eval.prdc(real, fake, nearest_k=3)
  ref = numpy_prdc(real, fake, 3)
  for key in KEYS:
    assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_identical_sets():
  real, _ = _sets(8, 64, 1, 8)
  out = lpl_eval.prdc(real, real, nearest_k=3)
  assert out['precision'] == out['recall'] == out['coverage'] == 1.0
  # Each sample lies in its own ball and in those of the neighbours that have it within their k-NN radius.
  assert out['density'] == pytest.approx(numpy_prdc(real, real, 3)['density'], abs=1e-12)


def test_far_apart_sets():
  real, fake = _sets(9, 40, 30, 8)
  out = lpl_eval.prdc(real, fake + 1000.0, nearest_k=5)
  assert out == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)


def test_errors():
  real, fake = _sets(10, 6, 6, 4)
  with pytest.raises(ValueError, match=r'6 real samples are too few for nearest_k=6.*at least 7'):
    lpl_eval.prdc(real, fake, nearest_k=6)
  with pytest.raises(ValueError, match='4 fake samples are too few for nearest_k=5'):
    lpl_eval.prdc(real, fake[:4], nearest_k=5)
  with pytest.raises(ValueError, match='same D'):
    lpl_eval.prdc(real, fake[:, :3], nearest_k=2)
