"""Frechet distance and statistics against pytorch-fid's own functions; statistics files and ADM batches."""

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from lpl_jax import eval as lpl_eval

# Singular products are the point of some tests; scipy's warnings about them (and about the error estimate that
# pytorch-fid asks of a non-finite root) are expected.
pytestmark = [
  pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning'),
  pytest.mark.filterwarnings('ignore:invalid value encountered in matmul:RuntimeWarning'),
]


def _features(seed, n, d, shift=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mixing) * scale + shift


def _numpy_statistics(x):
  """Mean and unbiased covariance written out: (x - mu)^T (x - mu) / (N - 1)."""
  x = np.asarray(x, np.float64)
  mu = x.sum(axis=0) / x.shape[0]
  centred = x - mu
  return mu, centred.T @ centred / (x.shape[0] - 1)


@pytest.mark.parametrize('n1,n2,d', [(400, 300, 32), (500, 500, 64)])
def test_frechet_distance_matches_pytorch_fid(n1, n2, d):
  mu1, s1 = lpl_eval.feature_statistics(_features(0, n1, d))
  mu2, s2 = lpl_eval.feature_statistics(_features(1, n2, d, shift=0.3, scale=1.2))
  ours = lpl_eval.frechet_distance(mu1, s1, mu2, s2)
  theirs = float(calculate_frechet_distance(mu1, s1, mu2, s2))
  print(f'Frechet distance {ours:.10f}, pytorch-fid {theirs:.10f}, |diff| = {abs(ours - theirs):.1e}')
  assert isinstance(ours, float) and abs(ours - theirs) <= 1e-6
  assert lpl_eval.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_rank_deficient_covariances_match_pytorch_fid():
  # N < D, and an exactly singular block: the product is singular, its square root still finite.
  d = 48
  mu1, s1 = lpl_eval.feature_statistics(_features(2, 10, d))
  mu2, s2 = lpl_eval.feature_statistics(_features(3, 12, d, shift=0.5))
  s1[:, :5] = s1[:5, :] = 0.0
  ours = lpl_eval.frechet_distance(mu1, s1, mu2, s2)
  theirs = float(calculate_frechet_distance(mu1, s1, mu2, s2))
  assert np.isfinite(ours) and abs(ours - theirs) <= 1e-6


@pytest.mark.parametrize(
  's1,s2',
  [
    (np.diag([1.0, 0.0]), np.array([[0.0, 2.0], [0.0, 0.0]])),
    (np.array([[0.0, 1.0], [0.0, 0.0]]), np.diag([1.0, 4.0])),
  ],
)
def test_non_finite_square_root_takes_the_eps_fallback_like_pytorch_fid(s1, s2, caplog):
  # A nilpotent product has no square root: scipy returns inf, both implementations retry with eps on the diagonals.
  mu1, mu2 = np.zeros(2), np.array([1.0, -1.0])
  ours = lpl_eval.frechet_distance(mu1, s1, mu2, s2)
  assert 'singular product' in caplog.text
  assert abs(ours - float(calculate_frechet_distance(mu1, s1, mu2, s2))) <= 1e-9


def test_imaginary_square_root_raises_like_pytorch_fid():
  s1, s2 = np.diag([1.0, 0.0]), np.array([[0.0, 1.0], [1.0, 0.0]])  # s2 is not a covariance
  with pytest.raises(ValueError, match='Imaginary component'):
    calculate_frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
  with pytest.raises(ValueError, match='imaginary diagonal'):
    lpl_eval.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)


def test_statistics_are_float64_mean_and_unbiased_covariance():
  x = _features(4, 50, 8).astype(np.float32)
  mu, sigma = lpl_eval.feature_statistics(x)
  ref_mu, ref_sigma = _numpy_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match='at least 2'):
    lpl_eval.feature_statistics(x[:1])


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match='same length'):
    lpl_eval.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r'\[D, D\] with D = 3'):
    lpl_eval.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))


def test_reference_stats_computed_once_then_cached(tmp_path):
  feats = _features(5, 40, 6)
  cache = tmp_path / 'ref_stats.npz'
  mu, sigma = lpl_eval.reference_stats(feats, cache=cache)
  with np.load(cache) as data:  # pytorch-fid's format
    assert sorted(data.files) == ['mu', 'sigma']
  ref_mu, ref_sigma = _numpy_statistics(feats)
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10)
  # A present cache is returned as is, whatever the other argument.
  mu2, sigma2 = lpl_eval.reference_stats(feats + 100.0, cache=cache)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)


def test_reference_stats_of_adm_batches(tmp_path):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
  with_stats = tmp_path / 'VIRTUAL_ref.npz'
  np.savez(with_stats, images, mu=np.arange(3.0), sigma=np.eye(3))  # ADM layout: positional arr_0 + mu/sigma
  mu, sigma = lpl_eval.reference_stats(str(with_stats))
  np.testing.assert_array_equal(mu, np.arange(3.0))
  np.testing.assert_array_equal(sigma, np.eye(3))

  only_images = tmp_path / 'samples.npz'
  lpl_eval.save_npz_images(only_images, images)
  mean_colour = lambda x: x.reshape(x.shape[0], -1, 3).mean(axis=1)  # a feature function anyone can check
  mu, sigma = lpl_eval.reference_stats(str(only_images), feature_fn=mean_colour)
  ref_mu, ref_sigma = _numpy_statistics(mean_colour(images.astype(np.float64)))
  np.testing.assert_allclose(mu, ref_mu)
  np.testing.assert_allclose(sigma, ref_sigma)
  with pytest.raises(ValueError, match='needs feature_fn'):
    lpl_eval.reference_stats(str(only_images))


def test_image_batch_layout_errors(tmp_path):
  np.savez(tmp_path / 'float.npz', np.zeros((2, 8, 8, 3), np.float32))
  np.savez(tmp_path / 'nchw.npz', np.zeros((2, 3, 8, 8), np.uint8))
  np.savez(tmp_path / 'gray.npz', np.zeros((2, 8, 8), np.uint8))
  np.savez(tmp_path / 'named.npz', images=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match='got dtype float32'):
    lpl_eval.load_npz_images(tmp_path / 'float.npz')
  with pytest.raises(ValueError, match=r'got shape \(2, 3, 8, 8\) \(NCHW\? transpose to NHWC\)'):
    lpl_eval.load_npz_images(tmp_path / 'nchw.npz')
  with pytest.raises(ValueError, match=r'expected uint8 \[N, H, W, 3\]'):
    lpl_eval.load_npz_images(tmp_path / 'gray.npz')
  with pytest.raises(ValueError, match="no 'arr_0' array.*'images'"):
    lpl_eval.load_npz_images(tmp_path / 'named.npz')
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    lpl_eval.load_npz_images(tmp_path / 'missing.npz')
