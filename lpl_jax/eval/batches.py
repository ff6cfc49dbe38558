"""Image batches in the ADM evaluator's layout: an `.npz` whose `arr_0` is uint8 `[N, H, W, 3]`.

This is what guided-diffusion's `sample.py` writes for samples and what its reference batches
(`VIRTUAL_imagenet256_labeled.npz`, ...) hold; reference batches also carry `mu`, `sigma` (and spatial
`mu_s`, `sigma_s`, unused here) computed by ADM's TensorFlow evaluator.
"""

from __future__ import annotations

import os

import numpy as np

IMAGES_KEY = 'arr_0'


def check_images(images: np.ndarray, what: str = 'images') -> np.ndarray:
  """Raises a ValueError unless `images` is uint8 `[N, H, W, 3]` (NHWC, RGB, 0..255); returns it."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    hint = ' (NCHW? transpose to NHWC)' if images.ndim == 4 and images.shape[1] == 3 else ''
    raise ValueError(f'{what}: expected uint8 [N, H, W, 3] images (NHWC, RGB); got shape {images.shape}{hint}.')
  if images.dtype != np.uint8:
    raise ValueError(
      f'{what}: expected uint8 [N, H, W, 3] images with values 0..255; got dtype {images.dtype} '
      '(convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1]).'
    )
  return images


def has_images(path: str | os.PathLike) -> bool:
  """Whether the `.npz` at `path` holds an `arr_0` array."""
  with np.load(os.fspath(path), allow_pickle=False) as data:
    return IMAGES_KEY in data.files


def load_npz_images(path: str | os.PathLike) -> np.ndarray:
  """`arr_0` of an ADM-layout `.npz`, checked to be uint8 `[N, H, W, 3]`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image batch {path!r} does not exist.')
  with np.load(path, allow_pickle=False) as data:
    if IMAGES_KEY not in data.files:
      raise ValueError(
        f'{path!r} has no {IMAGES_KEY!r} array (ADM layout: arr_0 = uint8 [N, H, W, 3]); it holds {sorted(data.files)}.'
      )
    images = data[IMAGES_KEY]
  return check_images(images, f'{path!r} {IMAGES_KEY}')


def save_npz_images(path: str | os.PathLike, images: np.ndarray) -> None:
  """Writes uint8 `[N, H, W, 3]` images as an ADM-layout `.npz` (`arr_0`)."""
  np.savez(os.fspath(path), check_images(images))
