"""Frechet distance between Gaussian fits of two feature sets (FID when the features are Inception pool3).

Statistics are float64 on the host, as in pytorch-fid: `mu` is the mean and `sigma` the unbiased covariance
(`np.cov(features, rowvar=False)`). Statistics files are `.npz` with keys `mu`, `sigma` (pytorch-fid's format);
ADM reference batches (`VIRTUAL_*.npz`) carry the same keys next to `arr_0`.

References:
  Heusel et al., 2017, GANs trained by a two time-scale update rule converge to a local Nash equilibrium (FID).
  pytorch-fid's `calculate_frechet_distance` (Dougal J. Sutherland's stable version), reproduced here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import scipy.linalg

from lpl_jax.eval.batches import load_npz_images

SINGULAR_EPS = 1e-6


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = SINGULAR_EPS
) -> float:
  """`|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`, in float64.

  As pytorch-fid: when the square root of the product is not finite (singular product), `eps` is added to both
  diagonals and the root recomputed; a complex root is accepted (real part kept) only if its diagonal's imaginary
  part is within 1e-3 of zero.

  Args:
    mu1: `[D]` mean of the first feature set.
    sigma1: `[D, D]` covariance of the first feature set.
    mu2: `[D]` mean of the second set.
    sigma2: `[D, D]` covariance of the second set.
    eps: diagonal offset of the fallback for a singular product.

  Returns:
    The squared Frechet distance (what is reported as FID), a Python float.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f'means must be [D] vectors of the same length; got {mu1.shape} and {mu2.shape}.')
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'covariances must be [D, D] with D = {mu1.shape[0]}; got {sigma1.shape} and {sigma2.shape}.')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning('Frechet distance: singular product; adding %s to the diagonal of both covariances.', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
        f'Frechet distance: the matrix square root has an imaginary diagonal (max |imag| = '
        f'{np.max(np.abs(covmean.imag))}); are the covariances positive semi-definite?'
      )
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


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
