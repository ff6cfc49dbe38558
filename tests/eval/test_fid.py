"""Frechet distance and statistics against pytorch-fid's own functions; statistics files and ADM batches."""

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from lpl_jax import eval as lpl_eval

# pytorch-fid's route (scipy.linalg.sqrtm of a singular product) is run on purpose below; whatever scipy says about
# it is expected.
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


def _sqrtm_route(mu1, s1, mu2, s2):
  return float(calculate_frechet_distance(mu1, s1, mu2, s2))


def _rotated_diagonals(seed, d=64):
  """`Q diag(a) Q^T`, `Q diag(b) Q^T` with zeros in `a` (first 40) and `b` (30..49): commuting, both singular."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  a[:40], b[30:50] = 0.0, 0.0
  return q, a, b


def _hard_case(name):
  """`(mu1, sigma1, mu2, sigma2, exact distance)` with singular covariances (rank well below D = 64)."""
  x1, x2 = _features(10, 20, 64), _features(11, 25, 64, shift=0.2)  # ranks 19 and 24
  (mu1, s1), (mu2, s2) = lpl_eval.feature_statistics(x1), lpl_eval.feature_statistics(x2)
  dmu = mu1 - mu2
  if name == 'scaled':  # sigma2 = c^2 sigma1: Tr((sigma1 sigma2)^(1/2)) = c Tr(sigma1)
    c = 1.1
    return mu1, s1, mu2, c * c * s1, dmu @ dmu + (1.0 - c) ** 2 * np.trace(s1)
  if name == 'cross_gram':
    # With X_i the centred features, sigma_i = X_i^T X_i / (n_i - 1) and the nonzero eigenvalues of sigma1 sigma2 are
    # the squared singular values of G = X1 X2^T / sqrt((n1 - 1)(n2 - 1)): a 20 x 25 SVD, no matrix square root.
    gram = (x1 - mu1) @ (x2 - mu2).T / np.sqrt(19 * 24)
    return mu1, s1, mu2, s2, dmu @ dmu + np.trace(s1) + np.trace(s2) - 2 * np.linalg.svd(gram, compute_uv=False).sum()
  q, a, b = _rotated_diagonals(12)
  if name == 'orthogonal_supports':  # eigenvectors 0..19 and 20..39: sigma1 sigma2 = 0
    i = np.arange(64)
    a, b = np.where(i < 20, 0.5 + i / 20, 0.0), np.where((i >= 20) & (i < 40), 2.5 - i / 20, 0.0)
  exact = dmu @ dmu + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  return mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, exact


@pytest.mark.parametrize('n1,n2,d', [(400, 300, 32), (500, 500, 64), (2000, 2000, 64)])
def test_frechet_distance_matches_pytorch_fid(n1, n2, d):
  mu1, s1 = lpl_eval.feature_statistics(_features(0, n1, d))
  mu2, s2 = lpl_eval.feature_statistics(_features(1, n2, d, shift=0.3, scale=1.2))
  ours = lpl_eval.frechet_distance(mu1, s1, mu2, s2)
  theirs = _sqrtm_route(mu1, s1, mu2, s2)
  print(f'Frechet distance {ours:.10f}, pytorch-fid {theirs:.10f}, relative diff {abs(ours - theirs) / theirs:.1e}')
  assert isinstance(ours, float) and ours == pytest.approx(theirs, rel=1e-6)
  assert lpl_eval.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9 * np.trace(s1))


@pytest.mark.parametrize('case', ['scaled', 'cross_gram', 'rotated_diagonals', 'orthogonal_supports'])
def test_singular_covariances_exact_where_sqrtm_is_not(case):
  # Measured (64-d, ranks 19-44), relative errors: ours <= 1e-14 in every case; pytorch-fid's sqrtm route 3e-7
  # (scaled), 2e-8 (cross_gram), 1.4e-8 (rotated_diagonals), 1.2e-8 (orthogonal_supports): sqrt(eps)-sized, as the
  # square root of a matrix with rounding-level eigenvalues is. Over 30 seeds of these constructions: ours <= 1.2e-14,
  # sqrtm >= 2.2e-7, 2.1e-8, 1.3e-8, 1.0e-8 respectively.
  mu1, s1, mu2, s2, exact = _hard_case(case)
  ours = lpl_eval.frechet_distance(mu1, s1, mu2, s2)
  sqrtm_error = abs(_sqrtm_route(mu1, s1, mu2, s2) - exact) / exact
  print(f'{case}: exact {exact:.12g}, ours relative error {abs(ours - exact) / exact:.1e}, sqrtm {sqrtm_error:.1e}')
  assert ours == pytest.approx(exact, rel=1e-11)
  if case == 'scaled':  # the widest, reproducible gap: asserted, the others only printed
    assert sqrtm_error > 1e-9


@pytest.mark.parametrize('n,d', [(20, 64), (100, 128)])  # 128-d: the small-domain feature size
def test_identical_singular_statistics_are_at_distance_zero(n, d):
  mu, sigma = lpl_eval.feature_statistics(_features(13, n, d))
  assert np.linalg.matrix_rank(sigma) == n - 1
  ours = lpl_eval.frechet_distance(mu, sigma, mu, sigma)
  sqrtm = _sqrtm_route(mu, sigma, mu, sigma)
  print(f'FD(x, x) / Tr(sigma): ours {ours / np.trace(sigma):.1e}, sqrtm {sqrtm / np.trace(sigma):.1e}')
  assert 0.0 <= ours <= 1e-9 * np.trace(sigma)
  if (n, d) == (20, 64):  # measured -3.7e-8 (a negative distance); at least 3.3e-8 in magnitude over 30 seeds
    assert abs(sqrtm) > 1e-9 * np.trace(sigma)


def test_symmetric_and_non_negative():
  pairs = [_hard_case(name)[:4] for name in ('scaled', 'cross_gram', 'rotated_diagonals', 'orthogonal_supports')]
  pairs.append(
    (*lpl_eval.feature_statistics(_features(14, 300, 32)), *lpl_eval.feature_statistics(_features(15, 8, 32)))
  )
  mu, sigma = lpl_eval.feature_statistics(_features(16, 30, 48))
  pairs.append((mu, sigma, mu + 1e-9, sigma * (1.0 + 1e-12)))  # nearly identical: the distance is all cancellation
  pairs.append((mu, sigma, mu, np.zeros_like(sigma)))  # a point mass: |dmu|^2 + Tr(sigma1)
  for mu1, s1, mu2, s2 in pairs:
    forward, backward = lpl_eval.frechet_distance(mu1, s1, mu2, s2), lpl_eval.frechet_distance(mu2, s2, mu1, s1)
    assert forward >= 0.0 and backward >= 0.0
    assert forward == pytest.approx(backward, rel=1e-12, abs=1e-12 * (np.trace(s1) + np.trace(s2)))
  assert lpl_eval.frechet_distance(mu, sigma, mu, np.zeros_like(sigma)) == pytest.approx(np.trace(sigma), rel=1e-12)


def test_float32_rounded_covariances_are_accepted():
  # A covariance accumulated in float32 is PSD only to ~1e-7 relative (negative eigenvalues): rounding, not an error.
  mu1, s1 = lpl_eval.feature_statistics(_features(17, 40, 96))
  mu2, s2 = lpl_eval.feature_statistics(_features(18, 60, 96, shift=0.1))
  x = _features(17, 40, 96).astype(np.float32)
  centred = x - x.mean(axis=0)
  s1_f32 = (centred.T @ centred / np.float32(39)).astype(np.float64)
  assert np.linalg.eigvalsh(s1_f32)[0] < 0.0  # negative rounding-level eigenvalues present
  exact = lpl_eval.frechet_distance(mu1, s1, mu2, s2)
  assert lpl_eval.frechet_distance(mu1, s1_f32, mu2, s2) == pytest.approx(exact, rel=1e-3)


def test_not_a_covariance_raises():
  # Non-symmetric: pytorch-fid's sqrtm of these products is not finite and it retries with eps on the diagonals.
  with pytest.raises(ValueError, match=r'sigma2 is not symmetric'):
    lpl_eval.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.array([[0.0, 2.0], [0.0, 0.0]]))
  with pytest.raises(ValueError, match=r'sigma1 is not symmetric'):
    lpl_eval.frechet_distance(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.zeros(2), np.diag([1.0, 4.0]))
  # Symmetric but indefinite: pytorch-fid finds an imaginary root.
  s1, s2 = np.diag([1.0, 0.0]), np.array([[0.0, 1.0], [1.0, 0.0]])
  with pytest.raises(ValueError, match='Imaginary component'):
    calculate_frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
  with pytest.raises(ValueError, match=r'sigma2 is not positive semi-definite: smallest eigenvalue -1'):
    lpl_eval.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
  with pytest.raises(ValueError, match=r'sigma1 is not positive semi-definite'):
    lpl_eval.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


def test_non_finite_inputs_raise():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match=r'mu1 has 1 non-finite \(NaN or infinite\) entries of 3'):
    lpl_eval.frechet_distance(np.array([0.0, np.nan, 0.0]), sigma, mu, sigma)
  bad = sigma.copy()
  bad[0, 1] = bad[1, 0] = np.inf
  with pytest.raises(ValueError, match=r'sigma2 has 2 non-finite \(NaN or infinite\) entries of 9'):
    lpl_eval.frechet_distance(mu, sigma, mu, bad)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match='same length'):
    lpl_eval.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r'\[D, D\] with D = 3'):
    lpl_eval.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match='non-empty'):
    lpl_eval.frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))


def test_statistics_are_float64_mean_and_unbiased_covariance():
  x = _features(4, 50, 8).astype(np.float32)
  mu, sigma = lpl_eval.feature_statistics(x)
  ref_mu, ref_sigma = _numpy_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match='at least 2'):
    lpl_eval.feature_statistics(x[:1])


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
