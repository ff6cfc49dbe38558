"""A small feature extractor for offline demos: NOT Inception, and its Frechet distance is NOT FID.

A small CNN is trained to tell apart crops of the photographs shipped inside scikit-image (astronaut, coffee,
chelsea, rocket, ...; nothing is downloaded): class = photograph. Its penultimate layer (128-d) gives features
whose Frechet distance, "Frechet distance (small-domain features, NOT Inception-FID)", compares image sets of that
small domain (e.g. a demo model trained on crops of the same photographs). The numbers are not comparable with FID
or with any published figure; use `lpl_jax.eval.inception` for FID.

Training takes well under a minute on two CPU cores (`train_small_domain_extractor`); parameters are saved as
`.npz` (flattened names) with a label entry that says what they are.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import skimage.data
from PIL import Image

from lpl_jax.eval import fid

METRIC_NAME = 'Frechet distance (small-domain features, NOT Inception-FID)'
PHOTOS = (
  'astronaut',
  'coffee',
  'chelsea',
  'rocket',
  'hubble_deep_field',
  'immunohistochemistry',
  'retina',
  'camera',
  'brick',
  'grass',
  'gravel',
  'moon',
)
INPUT_SIZE = 64
FEATURE_DIM = 128
_LABEL_KEY = '__label__'
_PHOTO_SIDE = 256  # photographs are resized so their short side is this, before cropping


class SmallDomainCNN(nn.Module):
  """Conv(16,s2) -> Conv(32,s2) -> Conv(64,s2) -> Conv(128,s2) -> global mean -> Dense(128) [features] -> classes."""

  num_classes: int = len(PHOTOS)

  def setup(self):
    self.convs = [
      nn.Conv(width, (3, 3), strides=(stride, stride), name=f'conv_{i}')
      for i, (width, stride) in enumerate(((16, 2), (32, 2), (64, 2), (128, 2)))
    ]
    self.penultimate = nn.Dense(FEATURE_DIM)
    self.classifier = nn.Dense(self.num_classes)

  def features(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` uint8 (or float in [0, 1]) -> `[B, 128]` penultimate features (resized to 64x64 first)."""
    x = images.astype(jnp.float32) / (255.0 if images.dtype == jnp.uint8 else 1.0)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[-1]), 'bilinear', antialias=True)
    x = 2.0 * x - 1.0
    for conv in self.convs:
      x = nn.relu(conv(x))
    return nn.relu(self.penultimate(jnp.mean(x, axis=(1, 2))))

  def __call__(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` -> `[B, num_classes]` logits."""
    return self.classifier(self.features(images))


def small_domain_features(params: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """`apply_fn` for `extract_features`: `[B, H, W, 3]` -> `[B, 128]` small-domain features (not Inception)."""
  return SmallDomainCNN().apply({'params': params}, images, method=SmallDomainCNN.features)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
  """The photographs as uint8 RGB, short side `_PHOTO_SIDE` (grayscale ones repeated over 3 channels)."""
  out = []
  for name in PHOTOS:
    photo = np.asarray(getattr(skimage.data, name)())  # read from the installed package
    if photo.ndim == 2:
      photo = np.repeat(photo[..., None], 3, axis=-1)
    image = Image.fromarray(photo[..., :3].astype(np.uint8))
    scale = _PHOTO_SIDE / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BILINEAR)
    out.append(np.asarray(image))
  return tuple(out)


def photo_crops(rng: np.random.Generator, num: int, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Random crops (side 20%-100% of the short side, random position, random horizontal flip), resized to `size`.

  Returns:
    `(images uint8 [num, size, size, 3], labels int32 [num])`, label = index of the photograph in `PHOTOS`.
  """
  photos = _photos()
  labels = rng.integers(0, len(photos), num).astype(np.int32)
  images = np.empty((num, size, size, 3), np.uint8)
  for i, label in enumerate(labels):
    photo = photos[label]
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.2, 1.0) * min(h, w))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
    crop = np.asarray(crop)
    images[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
  return images, labels


def _loss(params, images, labels):
  logits = SmallDomainCNN().apply({'params': params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames=('tx',), donate_argnums=(0, 1))
def _train_step(params, opt_state, images, labels, *, tx):
  loss, grads = jax.value_and_grad(_loss)(params, images, labels)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def _accuracy(params, images, labels):
  logits = SmallDomainCNN().apply({'params': params}, images)
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def train_small_domain_extractor(
  *,
  steps: int = 300,
  batch_size: int = 64,
  learning_rate: float = 2e-3,
  num_crops: int = 4096,
  seed: int = 0,
  path: str | os.PathLike | None = None,
  verbose: bool = True,
) -> tuple[dict, dict[str, float]]:
  """Trains the small-domain CNN (NOT Inception) to classify crops of scikit-image's photographs.

  Args:
    steps: Adam steps.
    batch_size: crops per step.
    learning_rate: Adam learning rate.
    num_crops: size of the pool of training crops (made once; the batches are drawn from it).
    seed: seeds the crops and the initialisation.
    path: if given, the parameters are saved there (`.npz`, see `save_params`).
    verbose: print the result.

  Returns:
    `(params, info)`: info has `final_loss`, `heldout_accuracy` (on 512 new crops) and `seconds`.
  """
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  images, labels = photo_crops(rng, num_crops)
  heldout_images, heldout_labels = photo_crops(np.random.default_rng(seed + 1_000_003), 512)
  model = SmallDomainCNN()
  params = model.init(jax.random.key(seed), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))['params']
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  loss = jnp.nan
  for _ in range(steps):
    idx = rng.integers(0, num_crops, batch_size)
    params, opt_state, loss = _train_step(params, opt_state, images[idx], labels[idx], tx=tx)
  info = dict(
    final_loss=float(loss),
    heldout_accuracy=float(_accuracy(params, heldout_images, heldout_labels)),
    seconds=time.perf_counter() - start,
  )
  if verbose:
    print(
      f'small-domain feature extractor (NOT Inception): {len(PHOTOS)} photographs, {steps} steps, '
      f'held-out crop accuracy {info["heldout_accuracy"]:.3f}, {info["seconds"]:.1f} s'
    )
  if path is not None:
    save_params(path, params)
  return params, info


def save_params(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
  """Writes the parameters as `.npz` (keys `conv_0/kernel`, ...) plus a label saying they are not Inception."""
  flat = {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  path = os.fspath(path)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, **flat, **{_LABEL_KEY: np.asarray(f'small-domain feature extractor, {METRIC_NAME}')})
  os.replace(tmp, path)


def load_params(path: str | os.PathLike) -> dict:
  """Reads parameters written by `save_params`, checking names and shapes against `SmallDomainCNN`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'small-domain extractor parameters {path!r} do not exist (train_small_domain_extractor(path=...) writes them).'
    )
  with np.load(path, allow_pickle=False) as data:
    if _LABEL_KEY not in data.files:
      raise ValueError(f'{path!r} was not written by save_params (no {_LABEL_KEY!r} entry).')
    flat = {tuple(k.split('/')): data[k] for k in data.files if k != _LABEL_KEY}
  expected = jax.eval_shape(lambda: SmallDomainCNN().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
  expected = {k: v.shape for k, v in flax.traverse_util.flatten_dict(expected['params']).items()}
  got = {k: v.shape for k, v in flat.items()}
  if got != expected:
    raise ValueError(
      f'{path!r} does not match SmallDomainCNN: missing {sorted(set(expected) - set(got))}, '
      f'unexpected {sorted(set(got) - set(expected))}, mis-shaped '
      f'{sorted(k for k in set(got) & set(expected) if got[k] != expected[k])}.'
    )
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def small_domain_frechet_distance(
  params: Mapping[str, Any], images_a: np.ndarray, images_b: np.ndarray, *, batch_size: int = 64
) -> float:
  """Frechet distance between the small-domain features of two uint8 `[N, H, W, 3]` sets: NOT Inception-FID."""
  from lpl_jax.eval.features import extract_features

  stats = [
    fid.feature_statistics(extract_features(x, small_domain_features, batch_size, params=params, progress=False))
    for x in (images_a, images_b)
  ]
  return fid.frechet_distance(*stats[0], *stats[1])
