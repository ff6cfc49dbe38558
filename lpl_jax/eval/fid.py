"""Frechet distance between Gaussian fits of two feature sets (FID when the features are Inception pool3).

Statistics are float64 on the host, as in pytorch-fid: `mu` is the mean and `sigma` the unbiased covariance
(`np.cov(features, rowvar=False)`). Statistics files are `.npz` with keys `mu`, `sigma` (pytorch-fid's format);
ADM reference batches (`VIRTUAL_*.npz`) carry the same keys next to `arr_0`.

References:
  Dowson & Landau, 1982, The Frechet distance between multivariate normal distributions (the closed form).
  Heusel et al., 2017, GANs trained by a two time-scale update rule converge to a local Nash equilibrium (FID).
  Bhatia, Jain & Lim, 2019, On the Bures-Wasserstein distance between positive definite matrices:
    Tr((A^(1/2) B A^(1/2))^(1/2)) = ||A^(1/2) B^(1/2)||_* (the fidelity as a nuclear norm), used for the trace term.
  pytorch-fid's `calculate_frechet_distance`: the same value on well-conditioned statistics (tested to 1e-6
    relative), but computed with `scipy.linalg.sqrtm` of the non-symmetric product, which this module departs from.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from lpl_jax.eval.batches import load_npz_images

# Largest asymmetry and most negative eigenvalue, relative to the matrix's largest entry / eigenvalue, accepted as
# rounding. A covariance accumulated in float32 (2048-d from 512 samples) measures -3e-7; np.cov is exactly symmetric.
COVARIANCE_RTOL = 1e-5


def _covariance_root(name: str, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(r, V)` with `sigma = V diag(r^2) V^T`, `r >= 0`: the symmetric square root `V diag(r) V^T`, factored.

  From `numpy.linalg.eigh`. Eigenvalues at or below `D * eps * lambda_max` (a bound on eigh's rounding error, and
  NumPy's `matrix_rank` tolerance) are set to exactly 0, negative ones included: the decomposition cannot tell them
  from 0, and for a covariance of fewer samples than dimensions 0 is their true value. Clipping only the negative ones
  would keep the positive half of that noise, whose square roots are ~sqrt(eps) = 1e-8 of the scale each.

  Raises:
    ValueError: `sigma` is not symmetric, or has an eigenvalue below `-COVARIANCE_RTOL * max|lambda|` (not a
      covariance; rounding does not reach that far).
  """
  scale = np.abs(sigma).max()
  asymmetry = np.abs(sigma - sigma.T).max()
  if asymmetry > COVARIANCE_RTOL * scale:
    raise ValueError(
      f'{name} is not symmetric: max |{name} - {name}^T| = {asymmetry:.3g} with max |{name}| = {scale:.3g}; '
      'is it a covariance?'
    )
  eigvals, eigvecs = np.linalg.eigh((sigma + sigma.T) / 2)  # ascending
  if eigvals[0] < -COVARIANCE_RTOL * np.abs(eigvals).max():
    raise ValueError(
      f'{name} is not positive semi-definite: smallest eigenvalue {eigvals[0]:.3g}, largest {eigvals[-1]:.3g}; '
      'is it a covariance?'
    )
  tol = sigma.shape[0] * np.finfo(np.float64).eps * max(eigvals[-1], 0.0)
  return np.sqrt(np.where(eigvals > tol, eigvals, 0.0)), eigvecs


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """`|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`, in float64, exact for singular covariances.

  With `sigma_i = V_i diag(r_i^2) V_i^T` (`eigh`, rounding-level eigenvalues set to 0; see `_covariance_root`) and
  `A = sigma1^(1/2)`, `B = sigma2^(1/2)` the symmetric square roots, the eigenvalues of `sigma1 sigma2` are those of
  the symmetric PSD `A sigma2 A = (A B)(A B)^T`, so `Tr((sigma1 sigma2)^(1/2))` is the sum of the singular values of
  `A B`, i.e. of `diag(r_1) V_1^T V_2 diag(r_2)` (the outer orthogonal factors dropped; zero rows and columns too).
  The traces are the sums of the kept eigenvalues, so the result is the distance between the Gaussians with those
  PSD covariances, which is >= 0; a negative value left by rounding is returned as 0.

  Departures: pytorch-fid takes `scipy.linalg.sqrtm` of the non-symmetric product, which is ill-conditioned when the
  product is singular (fewer samples than dimensions: measured relative errors of 1e-8 to 1e-6, and a negative
  distance between identical sets; pytorch-fid also needs an eps retry and a tolerance on imaginary parts). Taking
  the eigenvalues of `A sigma2 A` and their square roots would be no better: eigh resolves the eigenvalues of that
  product only to `eps * |A sigma2 A|`, so each zero one becomes up to ~1e-8 * |A B| after the square root. The
  singular values of `A B` are resolved to `eps * |A B|` instead; the result is symmetric in its two arguments to
  rounding (`diag(r_2) V_2^T V_1 diag(r_1)` is the transpose).

  Args:
    mu1: `[D]` mean of the first feature set.
    sigma1: `[D, D]` covariance of the first feature set (symmetric positive semi-definite).
    mu2: `[D]` mean of the second set.
    sigma2: `[D, D]` covariance of the second set.

  Returns:
    The squared Frechet distance (what is reported as FID), a Python float.

  Raises:
    ValueError: mismatched or empty shapes, a NaN or infinite entry, or a covariance that is not symmetric PSD.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1 or mu1.shape[0] == 0:
    raise ValueError(f'means must be non-empty [D] vectors of the same length; got {mu1.shape} and {mu2.shape}.')
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'covariances must be [D, D] with D = {mu1.shape[0]}; got {sigma1.shape} and {sigma2.shape}.')
  for name, x in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
    bad = np.count_nonzero(~np.isfinite(x))
    if bad:
      raise ValueError(f'{name} has {bad} non-finite (NaN or infinite) entries of {x.size}.')
  r1, v1 = _covariance_root('sigma1', sigma1)
  r2, v2 = _covariance_root('sigma2', sigma2)
  keep1, keep2 = r1 > 0, r2 > 0
  cross = r1[keep1, None] * (v1[:, keep1].T @ v2[:, keep2]) * r2[None, keep2]
  trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum() if cross.size else 0.0
  diff = mu1 - mu2
  distance = diff @ diff + np.sum(r1 * r1) + np.sum(r2 * r2) - 2.0 * trace_sqrt
  return max(float(distance), 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`[N, D]` features -> float64 `(mu [D], sigma [D, D])`, sigma unbiased (pytorch-fid's `np.cov(rowvar=False)`)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f'features must be [N, D]; got shape {features.shape}.')
  if features.shape[0] < 2:
    raise ValueError(f'a covariance needs at least 2 feature vectors; got {features.shape[0]}.')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes pytorch-fid's statistics format (`.npz` with `mu`, `sigma`), atomically."""
  path = os.fspath(path)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
  os.replace(tmp, path)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
  """`(mu, sigma)` of an `.npz` that has both keys (pytorch-fid stats, ADM reference batch), else None."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'statistics file {path!r} does not exist.')
  with np.load(path, allow_pickle=False) as data:
    if 'mu' in data.files and 'sigma' in data.files:
      return np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
  return None


def reference_stats(
  path_or_features: str | os.PathLike | np.ndarray,
  *,
  cache: str | os.PathLike | None = None,
  feature_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Reference `(mu, sigma)`, computed once and cached.

  Args:
    path_or_features: `[N, D]` features; or an `.npz` with `mu`/`sigma` (used as they are); or an image batch
      `.npz` (`arr_0`, uint8 `[N, H, W, 3]`, ADM layout) whose features `feature_fn` computes.
    cache: statistics file. If it exists, it is returned without looking at `path_or_features`; otherwise the
      statistics are computed and written there (pytorch-fid format). Delete it when the features change.
    feature_fn: `uint8 [N, H, W, 3] -> [N, D]`, needed only for image batches.

  Returns:
    float64 `(mu [D], sigma [D, D])`.
  """
  if cache is not None and os.path.isfile(cache):
    stats = load_statistics(cache)
    if stats is None:
      raise ValueError(f'cache {os.fspath(cache)!r} exists but has no mu/sigma arrays.')
    return stats
  if isinstance(path_or_features, (str, os.PathLike)):
    stats = load_statistics(path_or_features)
    if stats is None:
      if feature_fn is None:
        raise ValueError(
          f'{os.fspath(path_or_features)!r} holds no mu/sigma; computing them from its images needs feature_fn.'
        )
      stats = feature_statistics(feature_fn(load_npz_images(path_or_features)))
  else:
    stats = feature_statistics(path_or_features)
  if cache is not None:
    save_statistics(cache, *stats)
  return stats
