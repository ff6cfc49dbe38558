"""Reference statistics of a data source, written once (`python -m lpl_jax.evaluate --write_reference`, which reads
the images with `lpl_jax.train.references`) and read by the training loop's evaluation (`lpl_jax.train.evaluation`),
so that real images are never read again.

A reference file is one `.npz`:

  format               'lpl_jax-eval-reference-v1'
  extractor            'inception' (pytorch-fid's pool3, 2048-d: FID) or 'small_domain' (128-d, NOT Inception-FID)
  resolution           the side of the real images the features were taken from (the data's `resolution`)
  source               the data source they came from (`embedded`, `folder:PATH`, `tfds:NAME`)
  num_images           how many images `mu` and `sigma` describe
  mu, sigma            float64 `[D]` and `[D, D]` (unbiased covariance), pytorch-fid's statistics
  features             float32 `[K, D]`: the first K features (a random subset: the images are read in a random
                       order) for precision/recall/density/coverage, which need real features, not statistics
  weights_fingerprint  float64: the sum of |w| over the extractor's weights (a mismatched weights file is found)
  small_domain/<name>  with the small-domain extractor: its parameters (they define its features; the loop uses them)

`mu`/`sigma` alone are pytorch-fid's statistics format, so `lpl_jax.eval.load_statistics` reads the file too.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np
from etils import epath

from lpl_jax.eval import small_domain
from lpl_jax.eval.fid import feature_statistics, frechet_distance
from lpl_jax.eval.inception import fid_features
from lpl_jax.eval.prdc import DC_NEAREST_K, PR_NEAREST_K, prdc

FORMAT = 'lpl_jax-eval-reference-v1'
EXTRACTORS = ('inception', 'small_domain')
# The name each extractor's Frechet distance is reported under: only Inception's is FID.
DISTANCE_NAMES = {'inception': 'fid', 'small_domain': 'fd_small_domain'}
MIN_FEATURES = max(PR_NEAREST_K, DC_NEAREST_K) + 1  # the k-th neighbour, self excluded, needs k + 1 points
DEFAULT_NUM_PRDC = 10000
_PARAMS_PREFIX = 'small_domain/'
_FINGERPRINT_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A frozen feature network: `apply(params, uint8 [B, H, W, 3]) -> float32 [B, D]`.

  Attributes:
    name: one of `EXTRACTORS`.
    params: its host parameters.
  """

  name: str
  params: Any

  @property
  def apply(self) -> Callable[[Any, jax.Array], jax.Array]:
    return fid_features if self.name == 'inception' else small_domain.small_domain_features

  def fingerprint(self) -> float:
    """The sum of |w| over every weight, float64: equal files give equal sums, a different file almost never."""
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(self.params)))


def make_extractor(
  name: str, *, inception_weights: str | os.PathLike | None = None, small_domain_params: Any = None
) -> Extractor:
  """The extractor `name`: Inception from its weights file (`load_inception`: `.pth` needs torch), or the
  small-domain CNN from its parameters (a dict, or a file `small_domain.save_params` wrote)."""
  if name == 'inception':
    if not inception_weights:
      raise ValueError('the inception extractor needs the weights file (pt_inception-2015-12-05-6726825d.pth).')
    from lpl_jax.eval.inception import load_inception

    return Extractor(name, load_inception(inception_weights)[1])
  if name == 'small_domain':
    if small_domain_params is None:
      raise ValueError('the small_domain extractor needs its parameters (small_domain.train_small_domain_extractor).')
    if isinstance(small_domain_params, (str, os.PathLike)):
      small_domain_params = small_domain.load_params(small_domain_params)
    return Extractor(name, jax.tree.map(np.asarray, small_domain_params))
  raise ValueError(f'unknown feature extractor {name!r}; expected one of {EXTRACTORS}.')


@dataclasses.dataclass(frozen=True)
class Reference:
  """What a reference file holds (see the module docstring); `small_domain_params` is None for Inception."""

  path: str
  extractor: str
  resolution: int
  source: str
  num_images: int
  mu: np.ndarray  # [D] float64
  sigma: np.ndarray  # [D, D] float64
  features: np.ndarray  # [K, D] float32
  weights_fingerprint: float
  small_domain_params: dict | None

  @property
  def distance_name(self) -> str:
    return DISTANCE_NAMES[self.extractor]


def save_reference(
  path: str | os.PathLike,
  features: np.ndarray,
  *,
  extractor: Extractor,
  resolution: int,
  source: str,
  num_prdc: int = DEFAULT_NUM_PRDC,
) -> None:
  """Writes the reference of `features` (`[N, D]`, in a random order of the images), atomically.

  Args:
    num_prdc: how many of the features (the first ones) to keep for the k-NN metrics; at most N.
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] < MIN_FEATURES:
    raise ValueError(f'a reference needs [N, D] features with N >= {MIN_FEATURES}; got shape {features.shape}.')
  if num_prdc < MIN_FEATURES:
    raise ValueError(f'num_prdc={num_prdc}: precision/recall/density/coverage need at least {MIN_FEATURES}.')
  mu, sigma = feature_statistics(features)
  arrays = dict(
    format=np.asarray(FORMAT),
    extractor=np.asarray(extractor.name),
    resolution=np.asarray(resolution, np.int64),
    source=np.asarray(source),
    num_images=np.asarray(features.shape[0], np.int64),
    mu=mu,
    sigma=sigma,
    features=features[:num_prdc],
    weights_fingerprint=np.asarray(extractor.fingerprint(), np.float64),
  )
  if extractor.name == 'small_domain':
    flat = flax.traverse_util.flatten_dict(extractor.params)
    arrays.update({_PARAMS_PREFIX + '/'.join(k): np.asarray(v) for k, v in flat.items()})
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _write_atomically(path, buffer.getvalue())


def _write_atomically(path: str | os.PathLike, data: bytes) -> None:
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if '://' in os.fspath(path):  # an object appears only when its upload completes
    target.write_bytes(data)
    return
  tmp = target.with_name(f'.{target.name}.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, target)


def _open(path: str | os.PathLike, what: str):
  target = epath.Path(path)
  if not target.is_file():
    raise FileNotFoundError(
      f'{what}={os.fspath(path)!r} does not exist; write it once with python -m lpl_jax.evaluate '
      '--write_reference=PATH --source=... --resolution=... --features=... (docs/eval.md).'
    )
  return target.open('rb')


def _scalar(data: Mapping[str, np.ndarray], key: str) -> Any:
  return data[key].item() if data[key].ndim == 0 else data[key]


def check_reference(
  path: str | os.PathLike, *, features: str, resolution: int | None = None, what: str = 'reference'
) -> dict[str, Any]:
  """Reads only the header of a reference file and checks it against what the caller will compare with it.

  Args:
    features: the extractor the caller uses (`eval.features`).
    resolution: the side of the caller's images (`data.resolution`), or None to accept any.
    what: how errors name the file (e.g. `'eval.reference'`).

  Returns:
    `{'extractor', 'resolution', 'source', 'num_images'}`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a reference file (e.g. pytorch-fid statistics only), another extractor, another resolution.
  """
  name = os.fspath(path)
  with _open(path, what) as f, np.load(f, allow_pickle=False) as data:
    if 'format' not in data.files or _scalar(data, 'format') != FORMAT:
      found = ', '.join(sorted(data.files)[:8])
      raise ValueError(
        f'{what}={name!r} is not a reference file written by python -m lpl_jax.evaluate --write_reference (it '
        f'holds {found}; a pytorch-fid statistics file has mu/sigma but no real features or extractor name).'
      )
    header = {k: _scalar(data, k) for k in ('extractor', 'resolution', 'source', 'num_images')}
  header['resolution'], header['num_images'] = int(header['resolution']), int(header['num_images'])
  if header['extractor'] != features:
    raise ValueError(
      f'{what}={name!r} holds {header["extractor"]} features, but the evaluation extracts {features} features '
      f'(eval.features={features!r}); write a reference with --features={features}.'
    )
  if resolution is not None and header['resolution'] != resolution:
    raise ValueError(
      f'{what}={name!r} was written from {header["resolution"]} px images, but the samples are {resolution} px '
      f'(data.resolution={resolution}); write a reference with --resolution={resolution}.'
    )
  return header


def load_reference(
  path: str | os.PathLike, *, features: str, resolution: int | None = None, what: str = 'reference'
) -> Reference:
  """The reference file at `path`, checked as `check_reference` does (same arguments and errors)."""
  header = check_reference(path, features=features, resolution=resolution, what=what)
  with _open(path, what) as f, np.load(f, allow_pickle=False) as data:
    params = None
    if features == 'small_domain':
      flat = {tuple(k[len(_PARAMS_PREFIX) :].split('/')): data[k] for k in data.files if k.startswith(_PARAMS_PREFIX)}
      params = flax.traverse_util.unflatten_dict(flat)
    return Reference(
      path=os.fspath(path),
      extractor=header['extractor'],
      resolution=header['resolution'],
      source=str(header['source']),
      num_images=header['num_images'],
      mu=np.asarray(data['mu'], np.float64),
      sigma=np.asarray(data['sigma'], np.float64),
      features=np.asarray(data['features'], np.float32),
      weights_fingerprint=float(data['weights_fingerprint']),
      small_domain_params=params,
    )


def check_weights(reference: Reference, extractor: Extractor, what: str = 'the extractor weights') -> None:
  """Raises a ValueError when `extractor` is not the network `reference` was written with (its fingerprint)."""
  got, want = extractor.fingerprint(), reference.weights_fingerprint
  if extractor.name != reference.extractor or abs(got - want) > _FINGERPRINT_RTOL * abs(want):
    raise ValueError(
      f'{what} are not the {reference.extractor} weights {reference.path!r} was written with (sum |w| = {got:.9g}, '
      f'the reference says {want:.9g}); use those weights or write the reference again with these.'
    )


def reference_extractor(reference: Reference, *, inception_weights: str | os.PathLike | None = None) -> Extractor:
  """The extractor that made `reference`'s features: its own small-domain params, or Inception from the weights
  file (checked against the reference's fingerprint)."""
  if reference.extractor == 'small_domain':
    return make_extractor('small_domain', small_domain_params=reference.small_domain_params)
  extractor = make_extractor('inception', inception_weights=inception_weights)
  check_weights(reference, extractor, f'the Inception weights {os.fspath(inception_weights)!r}')
  return extractor


def compare(reference: Reference, fake: np.ndarray) -> dict[str, float]:
  """Frechet distance, precision, recall, density and coverage of the `[M, D]` features `fake` against `reference`.

  The k-NN metrics compare `fake` with the first `min(K, M)` real features, so both sets have the same size where
  the file allows (Naeem et al. compare equal numbers); k = 3 for precision/recall, 5 for density/coverage.

  Returns:
    `{distance_name ('fid' or 'fd_small_domain'), 'precision', 'recall', 'density', 'coverage'}`, Python floats.
  """
  fake = np.asarray(fake, np.float32)
  if fake.ndim != 2 or fake.shape[1] != reference.mu.shape[0]:
    raise ValueError(f'features must be [M, {reference.mu.shape[0]}] ({reference.extractor}); got {fake.shape}.')
  if fake.shape[0] < MIN_FEATURES:
    raise ValueError(f'{fake.shape[0]} features are too few: the k-NN metrics need at least {MIN_FEATURES}.')
  distance = frechet_distance(*feature_statistics(fake), reference.mu, reference.sigma)
  real = reference.features[: fake.shape[0]]
  pr, dc = prdc(real, fake, nearest_k=PR_NEAREST_K), prdc(real, fake, nearest_k=DC_NEAREST_K)
  return {
    reference.distance_name: distance,
    'precision': pr['precision'],
    'recall': pr['recall'],
    'density': dc['density'],
    'coverage': dc['coverage'],
  }
