"""The per-layer pieces of the loss, one function per equation: normalisation, masked distance, depth weights.

Arrays are NHWC, `[B, H, W, C]`, float32; masks are bool with the same shape (True = keep) or None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

STANDARDIZE_EPS = 1e-6  # variance floor of the paper's standardisation (a constant map maps to 0, not NaN)
SHARED_EPS = 1e-6  # the reference's "shared" normalisation
DEFAULT_EPS = 1e-10  # the reference's "default" normalisation (LPIPS' normalize_tensor)
NORM_AXES = ('space', 'channels')  # what the paper's standardisation reduces over (`standardize_shared`)


def _count(mask: jax.Array | None, x: jax.Array, axis: tuple[int, ...] = (1, 2)) -> jax.Array:
  """Unmasked entries along `axis` (kept as size-1 axes; by default positions per sample and channel,
  `[B, 1, 1, C]`), at least 1: an all-masked map counts as 1, so sums over it divide to 0 instead of NaN."""
  if mask is None:
    shape = [1 if i in axis else n for i, n in enumerate(x.shape)]
    return jnp.full(shape, math.prod(x.shape[i] for i in axis), x.dtype)
  return jnp.maximum(jnp.sum(mask, axis=axis, keepdims=True, dtype=x.dtype), 1.0)


def standardize_shared(
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array | None = None,
  *,
  axis: str = 'space',
  stats_gradient: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The paper's normalisation: standardisation with the prediction's mean and std (over unmasked entries), applied
  to both tensors, so a correct prediction has zero loss and zero gradient.

  The paper leaves two things open, and both readings are offered (docs/lpl.md gives the evidence for the defaults):
  - `axis`: `'space'` standardises each channel over the positions of its map (section 3.2: "normalize them per
    channel so that the features in every channel in every layer are zero mean and have unit variance"); `'channels'`
    standardises each position's channel vector (Eq. 3's "standardized ... across the channel dimension", and
    LPIPS, which normalises over channels at each position).
  - `stats_gradient`: with the prediction's statistics applied to both tensors, a channel's loss is
    `|p - t|^2 / sigma_p^2`. A gradient through `sigma_p` lowers the loss by inflating the prediction's feature
    variance, a direction that has nothing to do with matching the target; with `False` the mean and std are
    constants of the backward pass (as the reference code's normalisers are), and the gradient is that of the
    distance alone.

  References:
    Berrada et al. 2025, section 3.2 ("Normalization") and Eq. 3; Zhang et al. 2018 (LPIPS), Eq. 1.
  """
  if axis not in NORM_AXES:
    raise ValueError(f'unknown standardisation axis {axis!r}; expected one of {NORM_AXES}.')
  reduce = (1, 2) if axis == 'space' else (3,)
  stats = pred if stats_gradient else jax.lax.stop_gradient(pred)
  weights = jnp.ones_like(pred) if mask is None else mask.astype(pred.dtype)
  count = _count(mask, pred, reduce)
  mean = jnp.sum(stats * weights, axis=reduce, keepdims=True) / count
  var = jnp.sum(jnp.square(stats - mean) * weights, axis=reduce, keepdims=True) / count
  inv_std = jax.lax.rsqrt(var + STANDARDIZE_EPS)
  return (pred - mean) * inv_std, (target - mean) * inv_std


def std_ratio(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """`[B]`: the mean over channels of std(pred_c) / std(target_c), each over the unmasked positions of the channel's
  map: above 1 when the prediction's features vary more than the target's (what a gradient through the
  normaliser's statistics can drive up). A constant target channel counts with its std floored at 1e-6. No
  gradient."""
  pred, target = jax.lax.stop_gradient(pred), jax.lax.stop_gradient(target)
  weights = jnp.ones_like(pred) if mask is None else mask.astype(pred.dtype)
  count = _count(mask, pred)

  def std(x):
    mean = jnp.sum(x * weights, axis=(1, 2), keepdims=True) / count
    return jnp.sqrt(jnp.sum(jnp.square(x - mean) * weights, axis=(1, 2), keepdims=True) / count)

  return jnp.mean(std(pred) / jnp.maximum(std(target), 1e-6), axis=(1, 2, 3))


def _channel_norm(x: jax.Array) -> jax.Array:
  """L2 norm over channels `[B, H, W, 1]`, with a zero (not NaN) gradient at an all-zero vector."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def normalize_by_target_norm(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference's "shared" normalisation: both divided by the target's channel L2 norm (+1e-6)."""
  denom = _channel_norm(target) + SHARED_EPS
  return pred / denom, target / denom


def normalize_each(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference's "default" normalisation (LPIPS): each divided by its own channel L2 norm (+1e-10)."""
  return pred / (_channel_norm(pred) + DEFAULT_EPS), target / (_channel_norm(target) + DEFAULT_EPS)


def normalize(
  kind: str,
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array | None = None,
  *,
  axis: str = 'space',
  stats_gradient: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """`'paper'` (`standardize_shared`, with `axis` and `stats_gradient`), `'shared'`, `'default'` or `'none'`; the
  last three work on each position's channel vector and ignore `axis` and `stats_gradient`."""
  if kind == 'paper':
    return standardize_shared(pred, target, mask, axis=axis, stats_gradient=stats_gradient)
  if kind == 'shared':
    return normalize_by_target_norm(pred, target)
  if kind == 'default':
    return normalize_each(pred, target)
  if kind == 'none':
    return pred, target
  raise ValueError(f'unknown normalisation {kind!r}.')


def masked_distance(
  pred: jax.Array, target: jax.Array, mask: jax.Array | None = None, *, distance: str = 'l2'
) -> jax.Array:
  """`1/C sum_c [ sum_hw mask * d(pred, target) / sum_hw mask ]` per sample `[B]` (eq. 3 with a masked mean).

  `d` is the squared (l2) or absolute (l1) difference. Eq. 3 writes a squared norm over positions; the mean over
  unmasked positions keeps the weight of the loss independent of resolution and matches the reference code.
  """
  diff = pred - target
  err = jnp.square(diff) if distance == 'l2' else jnp.abs(diff)
  if mask is not None:
    err = jnp.where(mask, err, 0.0)
  per_channel = jnp.sum(err, axis=(1, 2), keepdims=True) / _count(mask, err)
  return jnp.mean(per_channel, axis=(1, 2, 3))


def depth_weights(kind: str, layers: Sequence[int], resolutions: Sequence[int]) -> tuple[float, ...]:
  """Static per-tap weights.

  - `'inverse_upscale'`: omega_l = r_first / r_l, the inverse upscaling factor of tap l w.r.t. the first used tap
    (the paper's text; its formula `2^{-r_l / r_1}` is read as this, which gives the weights its prose describes).
  - `'power_law'`: 2^-min(i, 3) for tap index i (the reference).
  - `'uniform'`: 1.
  """
  if kind == 'inverse_upscale':
    return tuple(resolutions[0] / r for r in resolutions)
  if kind == 'power_law':
    return tuple(2.0 ** -min(i, 3) for i in layers)
  if kind == 'uniform':
    return tuple(1.0 for _ in layers)
  raise ValueError(f'unknown depth weighting {kind!r}.')
