"""Per-record image transforms: square crop (random or centred), resize, horizontal flip, and the [-1, 1] scaling.

Records are dicts of NumPy arrays, images `uint8 [H, W, 3]`. Everything random draws from the `np.random.Generator`
grain hands to a random map for each record (seeded from the pipeline seed and the record's position in the
global stream), so a record is transformed identically however many processes or workers read it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class CropConfig:
  """How a training image becomes a `resolution x resolution` square.

  Attributes:
    resolution: output side in pixels.
    random_crop: a square of side `uniform(*crop_scale) * short side` at a uniform position; otherwise the centred
      square of the short side (the ADM/DiT ImageNet preprocessing).
    crop_scale: range of the random square's side, as a fraction of the image's short side.
    random_flip: horizontal flip with probability 1/2.
  """

  resolution: int
  random_crop: bool = False
  crop_scale: tuple[float, float] = (0.5, 1.0)
  random_flip: bool = False

  def __post_init__(self):
    if self.resolution < 1:
      raise ValueError(f'resolution must be >= 1, got {self.resolution}.')
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f'crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1 (fractions of the short side).')

  @property
  def is_random(self) -> bool:
    return self.random_crop or self.random_flip


def to_rgb(image: np.ndarray) -> np.ndarray:
  """`[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` (alpha dropped) uint8 -> `[H, W, 3]` uint8."""
  image = np.asarray(image)
  if image.dtype == np.bool_:
    image = image.astype(np.uint8) * 255
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8, got {image.dtype} with shape {image.shape}.')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'expected an image [H, W] or [H, W, 1|3|4], got shape {image.shape}.')
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def crop_box(height: int, width: int, cfg: CropConfig, rng: np.random.Generator | None) -> tuple[int, int, int]:
  """`(top, left, side)` of the square crop of a `height x width` image."""
  short = min(height, width)
  if cfg.random_crop:
    side = max(1, int(round(rng.uniform(*cfg.crop_scale) * short)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side
  return (height - short) // 2, (width - short) // 2, short


def crop_resize_flip(image: np.ndarray, cfg: CropConfig, rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 `[H, W, 3]` -> uint8 `[resolution, resolution, 3]`; `rng` is required when `cfg.is_random`."""
  if cfg.is_random and rng is None:
    raise ValueError('a random crop or flip needs the per-record rng of a random map.')
  top, left, side = crop_box(image.shape[0], image.shape[1], cfg, rng)
  crop = image[top : top + side, left : left + side]
  if side != cfg.resolution:
    # PIL's bicubic filter widens its support when downsampling, so this is an antialiased resize.
    crop = np.asarray(Image.fromarray(crop).resize((cfg.resolution, cfg.resolution), Image.Resampling.BICUBIC))
  if cfg.random_flip and rng.random() < 0.5:
    crop = crop[:, ::-1]
  return np.ascontiguousarray(crop)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
  return images.astype(np.float32) / 127.5 - 1.0
