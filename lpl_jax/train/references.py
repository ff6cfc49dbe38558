"""Reference files of a data source (`lpl_jax.eval.reference`): its images read once, as the trainer crops them, their
features extracted and summarised. What `python -m lpl_jax.evaluate --write_reference` runs; the training loop's
evaluation (`lpl_jax.train.evaluation`) then compares its samples with the file and never reads a real image.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from lpl_jax import data as data_lib
from lpl_jax.data.transforms import crop_resize_flip
from lpl_jax.eval import reference as ref_lib
from lpl_jax.eval import small_domain
from lpl_jax.eval.features import extract_features

log = logging.getLogger(__name__)


def read_images(
  source: str,
  *,
  resolution: int,
  num_images: int,
  seed: int = 0,
  random_crop: bool | None = None,
  split: str = 'train',
  data_dir: str | None = None,
  batch_size: int = 64,
  threads: int = 8,
) -> tuple[Iterator[np.ndarray], int]:
  """`(uint8 [b, R, R, 3] batches, their total count)`: `num_images` images of a data source in a random order,
  cropped and resized as the training pipeline does (`data.transforms.crop_resize_flip`), without flips.

  Args:
    source: `embedded`, `folder:PATH` or `tfds:NAME` (`data.source`; a latent cache holds no images).
    random_crop: random squares of 0.5-1 of the short side (seeded per image by `(seed, index)`) or the centred
      square; None: random for the embedded photographs (17 pictures: only crops make a distribution of them),
      centred otherwise.
    batch_size: images per yielded batch; `threads` decode them.

  A finite source with fewer images than `num_images` gives all it has (in a random order).
  """
  if source.startswith('cache:'):
    raise ValueError(f'source {source!r} is a latent cache, which holds no images; use the source it was encoded from.')
  embedded = source == 'embedded'
  src = data_lib.make_source(source, split=split, data_dir=data_dir, num_samples=num_images if embedded else None)
  random_crop = embedded if random_crop is None else random_crop
  crop = data_lib.CropConfig(resolution, random_crop=random_crop)
  if embedded:  # a virtual length: record i is photograph i % 17, each record its own crop
    indices = np.arange(num_images)
  else:
    indices = np.random.default_rng(seed).permutation(len(src))[:num_images]
    if len(indices) < num_images:
      log.warning('%s holds %d images, fewer than the %d asked for: using them all.', source, len(indices), num_images)

  def one(index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, int(index)]) if random_crop else None
    return crop_resize_flip(src[int(index)]['image'], crop, rng)

  def batches() -> Iterator[np.ndarray]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL decodes and resizes outside the GIL
      for start in range(0, len(indices), batch_size):
        yield np.stack(list(pool.map(one, indices[start : start + batch_size])))

  return batches(), len(indices)


def write_reference(
  path: str | os.PathLike,
  *,
  source: str,
  resolution: int,
  features: str,
  num_images: int,
  num_prdc: int = ref_lib.DEFAULT_NUM_PRDC,
  inception: str | os.PathLike | None = None,
  small_domain_params: Any = None,
  small_domain_steps: int = 300,
  batch_size: int = 50,
  seed: int = 0,
  random_crop: bool | None = None,
  split: str = 'train',
  data_dir: str | None = None,
  progress: bool = True,
) -> ref_lib.Reference:
  """Reads `num_images` images of `source` (`read_images`), extracts their `features` in batches of `batch_size` over
  all local devices, and writes the reference file (`reference.save_reference`); returns it as `load_reference` does.

  Args:
    features: `'inception'` (with the weights file `inception`) or `'small_domain'` (with its params, a dict or a
      `small_domain.save_params` file; None: one is trained now for `small_domain_steps` steps from `seed`).
    num_prdc: real features kept for precision/recall/density/coverage.
  """
  if num_images < ref_lib.MIN_FEATURES:
    raise ValueError(f'num_images={num_images}: a reference needs at least {ref_lib.MIN_FEATURES} images.')
  if features == 'small_domain' and small_domain_params is None:
    small_domain_params, _ = small_domain.train_small_domain_extractor(steps=small_domain_steps, seed=seed)
  extractor = ref_lib.make_extractor(features, inception_weights=inception, small_domain_params=small_domain_params)
  images, count = read_images(
    source,
    resolution=resolution,
    num_images=num_images,
    seed=seed,
    random_crop=random_crop,
    split=split,
    data_dir=data_dir,
  )
  feats = extract_features(
    images, extractor.apply, batch_size, params=extractor.params, progress=progress, desc='reference'
  )
  assert feats.shape[0] == count, (feats.shape, count)
  ref_lib.save_reference(path, feats, extractor=extractor, resolution=resolution, source=source, num_prdc=num_prdc)
  return ref_lib.load_reference(path, features=features, resolution=resolution)
