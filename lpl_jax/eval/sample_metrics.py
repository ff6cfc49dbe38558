"""FID, precision, recall, density and coverage of a sample batch against a reference batch (the library half of
`python -m lpl_jax.evaluate`).

Samples are an ADM-layout batch (`arr_0` = uint8 `[N, H, W, 3]`). The reference is a batch of the same layout (and
optionally `mu`/`sigma`), or a pytorch-fid statistics file (`mu`/`sigma` only: FID alone, the k-NN metrics need
reference images). Features are pytorch-fid's FID Inception pool3 (`inception`). Precision/recall use k=3
(Kynkaanniemi et al.), density/coverage k=5 (Naeem et al.).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from lpl_jax.eval.batches import has_images, load_npz_images
from lpl_jax.eval.features import extract_features
from lpl_jax.eval.fid import feature_statistics, frechet_distance, load_statistics
from lpl_jax.eval.inception import fid_features, load_inception
from lpl_jax.eval.prdc import DC_NEAREST_K, PR_NEAREST_K, prdc

REF_STATS = ('computed', 'stored')


def _reference(
  ref: str, ref_stats: str, ref_cache: str | None, feature_fn: Callable[[str, str], np.ndarray]
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, str]:
  """`(ref_features or None, mu, sigma, where the statistics came from)` of the reference."""
  if ref_cache and os.path.isfile(ref_cache):
    with np.load(ref_cache, allow_pickle=False) as data:
      features = data['features']
    return features, *feature_statistics(features), f'cached features {ref_cache}'
  stored = load_statistics(ref)
  if not has_images(ref):
    if stored is None:
      raise ValueError(f'{ref!r} has neither images (arr_0) nor statistics (mu, sigma).')
    return None, *stored, f'stored mu/sigma of {ref}'
  features = feature_fn(ref, 'reference')
  if ref_cache:
    mu, sigma = feature_statistics(features)
    tmp = ref_cache + '.tmp'
    with open(tmp, 'wb') as f:
      np.savez(f, features=features, mu=mu, sigma=sigma)
    os.replace(tmp, ref_cache)
  if ref_stats == 'stored' and stored is not None:
    return features, *stored, f'stored mu/sigma of {ref}'
  return features, *feature_statistics(features), f'Inception features of {ref} images'


def evaluate_samples(
  samples: str | os.PathLike,
  ref: str | os.PathLike,
  inception: str | os.PathLike,
  *,
  batch_size: int = 50,
  nearest_k_pr: int = PR_NEAREST_K,
  nearest_k_dc: int = DC_NEAREST_K,
  ref_stats: str = 'computed',
  ref_cache: str | os.PathLike | None = None,
  progress: bool = True,
  out: str | os.PathLike | None = None,
) -> dict:
  """FID, precision, recall, density and coverage of `samples` against `ref`.

  The inputs are checked (files exist, the samples' layout and count) before the Inception weights are imported,
  which takes a while.

  Args:
    samples: ADM-layout `.npz` of generated images (`arr_0` uint8 `[N, H, W, 3]`).
    ref: reference batch `.npz` (`arr_0`, optional `mu`/`sigma`) or pytorch-fid statistics (`mu`/`sigma`).
    inception: pytorch-fid Inception weights (`.pth`, or its `.npz`/`.safetensors` export; see `load_inception`).
    batch_size: images per Inception batch (global, over all devices).
    nearest_k_pr: k of precision and recall.
    nearest_k_dc: k of density and coverage.
    ref_stats: FID reference statistics when `ref` has both images and `mu`/`sigma`: `'computed'` from its images
      with this Inception, or `'stored'` (e.g. the ADM batch's, from ADM's TensorFlow evaluator).
    ref_cache: cache of the reference features (`.npz` with `features`, `mu`, `sigma`); written if missing, used
      (without looking at `ref`) if present.
    progress: show progress bars.
    out: also write the metrics here, as JSON.

  Returns:
    `fid`, `precision`, `recall`, `density`, `coverage` (the last four `None` for a statistics-only reference),
    `num_samples`, `num_reference` (`None` likewise), `nearest_k_pr`, `nearest_k_dc` and `reference_statistics`
    (where the reference `mu`/`sigma` came from).

  Raises:
    FileNotFoundError: the samples, reference or weights file does not exist.
    ValueError: a k below 1, an unknown `ref_stats`, samples that are not uint8 `[N, H, W, 3]` or too few for the
      k, a reference with neither images nor statistics.
    ImportError: the weights are a torch `.pth` and torch is not installed.
  """
  for name, k in (('nearest_k_pr', nearest_k_pr), ('nearest_k_dc', nearest_k_dc)):
    if k < 1:
      raise ValueError(f'{name} must be >= 1; got {k}.')
  if ref_stats not in REF_STATS:
    raise ValueError(f'ref_stats={ref_stats!r}; expected one of {REF_STATS}.')
  samples, ref = os.fspath(samples), os.fspath(ref)
  ref_cache = None if ref_cache is None else os.fspath(ref_cache)
  for what, path in (('samples', samples), ('reference', ref)):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{what} file {path!r} does not exist.')
  images = load_npz_images(samples)  # layout checked before the (slow) weight import
  k_max = max(nearest_k_pr, nearest_k_dc)
  if images.shape[0] < k_max + 1:
    raise ValueError(f'{images.shape[0]} samples are too few for nearest_k={k_max}: need at least {k_max + 1}.')
  _, params = load_inception(inception)

  def feature_fn(batch, desc):
    return extract_features(batch, fid_features, batch_size, params=params, progress=progress, desc=desc)

  ref_features, mu_ref, sigma_ref, ref_source = _reference(ref, ref_stats, ref_cache, feature_fn)
  fake = feature_fn(images, 'samples')
  mu, sigma = feature_statistics(fake)
  metrics = dict(fid=frechet_distance(mu, sigma, mu_ref, sigma_ref))
  if ref_features is not None:
    pr = prdc(ref_features, fake, nearest_k=nearest_k_pr)
    dc = prdc(ref_features, fake, nearest_k=nearest_k_dc)
    metrics.update(precision=pr['precision'], recall=pr['recall'], density=dc['density'], coverage=dc['coverage'])
  else:
    metrics.update(precision=None, recall=None, density=None, coverage=None)
  metrics.update(
    num_samples=int(fake.shape[0]),
    num_reference=None if ref_features is None else int(ref_features.shape[0]),
    nearest_k_pr=nearest_k_pr,
    nearest_k_dc=nearest_k_dc,
    reference_statistics=ref_source,
  )
  if out is not None:
    out = os.fspath(out)
    tmp = out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(metrics, f, indent=2)
    os.replace(tmp, out)
  return metrics
