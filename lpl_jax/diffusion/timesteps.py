"""Timestep samplers, and the stratified sampler that gives the LPL a static number of rows below its threshold.

Every sampler is `t = G(u)` with `u ~ U(0, 1)` and `G` non-decreasing (the inverse CDF of its distribution):
uniform, logit-normal (`sigmoid(m + s * Phi^-1(u))`) and SD3's mode sampling with heavy tails, optionally followed
by SD3's resolution-dependent shift. That form makes stratification exact: with `u*` the largest `u` whose timestep
is at or below a noise-level threshold (noise level is monotone in t) and `K = floor(u* B)`, rows `[:K]` draw `u`
from `U(0, K/B)` and rows `[K:]` from `U(K/B, 1)`. Rows `[:K]` are always below the threshold, `K` is static, and the
pooled marginal of t is exactly the unstratified one. (`round(u* B)` would need rows above the threshold among the
first K to keep the marginal; flooring gives up at most one row per batch of LPL instead.)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri
from scipy.special import ndtri as np_ndtri

from lpl_jax.diffusion.formulations import Formulation

KINDS = ('uniform', 'logit_normal', 'mode')


def shift_time(t, shift: float, xp=jnp):
  """SD3's time shift `shift * t / (1 + (shift - 1) * t)` (Esser et al. 2024, eq. 23); identity for shift 1."""
  return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def resolution_shift(resolution: int, base_resolution: int = 256) -> float:
  """SD3's shift for a resolution: sqrt(pixels / base pixels) = resolution / base_resolution."""
  return resolution / base_resolution


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
  """A distribution of training timesteps.

  Attributes:
    kind: `'uniform'`, `'logit_normal'` or `'mode'` (SD3's mode sampling with heavy tails).
    num_timesteps: T for DDPM formulations (integer t in [0, T)); None for flows (float t in [0, 1]).
    logit_mean, logit_std: the logit-normal's parameters.
    mode_scale: SD3's s of mode sampling (monotone for s < 2 / (pi - 2)).
    shift: SD3's time shift (continuous t only); `resolution_shift(res)` gives the resolution-dependent one.
  """

  kind: str = 'uniform'
  num_timesteps: int | None = None
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29
  shift: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown timestep sampler {self.kind!r}; known: {KINDS}.')
    if self.logit_std <= 0 or self.shift <= 0:
      raise ValueError(f'logit_std and shift must be positive, got {self.logit_std}, {self.shift}.')
    if self.kind == 'mode' and not -1 <= self.mode_scale < 2 / (math.pi - 2):
      raise ValueError(
        f'mode_scale={self.mode_scale} makes mode sampling non-monotone; use a value in [-1, {2 / (math.pi - 2):.3f}).'
      )

  def quantile(self, u, xp=jnp):
    """`G(u)`: the timestep at CDF level u (vectorised; `xp` is jnp in the step, np on the host)."""
    if self.kind == 'uniform':
      t = u
    elif self.kind == 'logit_normal':
      inv = ndtri if xp is jnp else np_ndtri
      t = 1 / (1 + xp.exp(-(self.logit_mean + self.logit_std * inv(xp.clip(u, 1e-7, 1 - 1e-7)))))
    else:
      v = 1 - u  # f_mode is decreasing in its argument
      t = 1 - v - self.mode_scale * (xp.cos(math.pi / 2 * v) ** 2 - 1 + v)
    t = shift_time(t, self.shift, xp)
    if self.num_timesteps is None:
      return t
    return xp.clip(xp.floor(t * self.num_timesteps), 0, self.num_timesteps - 1).astype(xp.int32)

  def sample(self, key: jax.Array, batch: int) -> jax.Array:
    """`[batch]` i.i.d. timesteps."""
    return self.quantile(jax.random.uniform(key, (batch,)))

  def split(self, formulation: Formulation, threshold: float, batch: int) -> int:
    """K: the static number of rows per batch of `batch` that are drawn below noise level `threshold`."""
    return math.floor(self.mass_below(formulation, threshold) * batch)

  def mass_below(self, formulation: Formulation, threshold: float) -> float:
    """u*: the probability that a drawn timestep has noise level sigma_t / alpha_t <= threshold."""
    if formulation.is_flow != (self.num_timesteps is None):
      raise ValueError(
        f'timestep sampler (num_timesteps={self.num_timesteps}) does not match formulation '
        f'{formulation.name!r}: DDPM needs integer timesteps, flows continuous ones.'
      )

    def below(u):
      t = self.quantile(np.asarray(u, np.float64), xp=np)
      return float(np.asarray(jax.device_get(formulation.noise_level(jnp.asarray(t))))) <= threshold

    if self.num_timesteps is not None and self.kind == 'uniform':
      levels = np.asarray(formulation.noise_level(jnp.arange(self.num_timesteps)))
      return float(np.sum(levels <= threshold)) / self.num_timesteps
    lo, hi = 0.0, 1.0  # bisection on the monotone predicate u -> below(G(u))
    if not below(lo):
      return 0.0
    if below(hi):
      return 1.0
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if below(mid) else (lo, mid)
    return lo

  def sample_stratified(self, key: jax.Array, batch: int, k: int) -> jax.Array:
    """`[batch]` timesteps: rows `[:k]` from the part of the distribution below the split, rows `[k:]` above it."""
    if not 0 <= k <= batch:
      raise ValueError(f'k={k} rows below the threshold for a batch of {batch}.')
    split = k / batch
    u = jax.random.uniform(key, (batch,))
    u = jnp.where(jnp.arange(batch) < k, u * split, split + u * (1 - split))
    return self.quantile(u)
