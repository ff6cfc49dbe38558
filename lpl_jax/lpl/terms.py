"""The per-layer pieces of the loss, one function per equation: normalisation, masked distance, depth weights.

Arrays are NHWC, `[B, H, W, C]`, float32; masks are bool with the same shape (True = keep) or None.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

STANDARDIZE_EPS = 1e-6  # variance floor of the paper's standardisation (a constant map maps to 0, not NaN)
SHARED_EPS = 1e-6  # the reference's "shared" normalisation
DEFAULT_EPS = 1e-10  # the reference's "default" normalisation (LPIPS' normalize_tensor)


def _count(mask: jax.Array | None, x: jax.Array) -> jax.Array:
  """Unmasked positions per sample and channel `[B, 1, 1, C]`, at least 1 (an all-masked map counts as 1, so
  sums over it divide to 0 instead of NaN)."""
  if mask is None:
    return jnp.full((x.shape[0], 1, 1, x.shape[-1]), x.shape[1] * x.shape[2], x.dtype)
  return jnp.maximum(jnp.sum(mask, axis=(1, 2), keepdims=True, dtype=x.dtype), 1.0)


def standardize_shared(
  pred: jax.Array, target: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """The paper's normalisation: per-channel standardisation over space with the prediction's mean and std
  (computed over unmasked positions), applied to both tensors, so a correct prediction has zero gradient.

  References:
    Berrada et al. 2025, section 3.2 ("Normalization").
  """
  weights = jnp.ones_like(pred) if mask is None else mask.astype(pred.dtype)
  count = _count(mask, pred)
  mean = jnp.sum(pred * weights, axis=(1, 2), keepdims=True) / count
  var = jnp.sum(jnp.square(pred - mean) * weights, axis=(1, 2), keepdims=True) / count
  inv_std = jax.lax.rsqrt(var + STANDARDIZE_EPS)
  return (pred - mean) * inv_std, (target - mean) * inv_std


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
  kind: str, pred: jax.Array, target: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  if kind == 'paper':
    return standardize_shared(pred, target, mask)
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
