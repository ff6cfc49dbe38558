"""Diffusion formulations behind one interface: DDPM-eps, DDPM-v, DDPM-x0 and Flow-OT.

Every one writes `x_t = alpha_t x0 + sigma_t eps` (paper Table 1) and gives the training target, the per-sample
diffusion loss and the estimate `x0_hat` (and `eps_hat`) from a model output. Time `t` is an integer timestep in
[0, T) for DDPM and a float in [0, 1] for flows; the denoiser sees `model_time(t)`, in [0, T) for both (flows:
t * 1000, as SD3), so one timestep embedding serves every formulation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax.diffusion.schedules import get_schedule

FORMULATIONS = ('ddpm_eps', 'ddpm_v', 'ddpm_x0', 'flow_ot')
FLOW_TIME_SCALE = 1000.0
_TINY = 1e-12  # floor of alpha_t in divisions (zero-terminal-SNR eps models at the last step)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Formulation:
  """A diffusion/flow formulation. Build with `get_formulation`.

  Attributes:
    name: one of `FORMULATIONS`.
    alphas_cumprod: `[T]` schedule of the DDPM formulations (None for flows).
  """

  name: str
  alphas_cumprod: np.ndarray | None = None

  @property
  def is_flow(self) -> bool:
    return self.name == 'flow_ot'

  @property
  def num_timesteps(self) -> int:
    return 1000 if self.is_flow else len(self.alphas_cumprod)

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(alpha_t, sigma_t)`, each shaped like `t`, float32."""
    if self.is_flow:
      t = jnp.asarray(t, jnp.float32)
      return 1.0 - t, t
    ac = jnp.asarray(self.alphas_cumprod, jnp.float32)[jnp.asarray(t, jnp.int32)]
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)

  def noise_level(self, t: jax.Array) -> jax.Array:
    """sigma_t / alpha_t (= SNR^-1/2), +inf where alpha_t == 0."""
    alpha, sigma = self.alpha_sigma(t)
    return jnp.where(alpha > 0, sigma / jnp.where(alpha > 0, alpha, 1.0), jnp.inf)

  def model_time(self, t: jax.Array) -> jax.Array:
    """What the denoiser's timestep embedding receives, in [0, T)."""
    t = jnp.asarray(t, jnp.float32)
    return t * FLOW_TIME_SCALE if self.is_flow else t

  def add_noise(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    alpha, sigma = self.alpha_sigma(t)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps

  def target(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """What the model is trained to output: eps, v = alpha eps - sigma x0, x0, or the flow velocity eps - x0."""
    if self.name == 'ddpm_eps':
      return eps
    if self.name == 'ddpm_x0':
      return x0
    if self.name == 'flow_ot':
      return eps - x0
    alpha, sigma = self.alpha_sigma(t)
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0

  def x0_hat(self, x_t: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array:
    """The clean-sample estimate from the model output (paper Table 1)."""
    alpha, sigma = (_bcast(v, x_t) for v in self.alpha_sigma(t))
    if self.name == 'ddpm_eps':
      return (x_t - sigma * pred) / jnp.maximum(alpha, _TINY)
    if self.name == 'ddpm_v':
      return alpha * x_t - sigma * pred
    if self.name == 'flow_ot':
      return x_t - sigma * pred
    return pred

  def eps_hat(self, x_t: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array:
    """The noise estimate from the model output."""
    alpha, sigma = (_bcast(v, x_t) for v in self.alpha_sigma(t))
    if self.name == 'ddpm_eps':
      return pred
    if self.name == 'ddpm_v':
      return alpha * pred + sigma * x_t
    if self.name == 'flow_ot':
      return x_t + alpha * pred
    return (x_t - alpha * pred) / jnp.maximum(sigma, _TINY)

  def min_snr_weight(self, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weights `[B]` (Hang et al. 2023): the weighting that makes this formulation's loss
    `min(SNR_t, gamma) |x0 - x0_hat|^2`, SNR_t = alpha_t^2 / sigma_t^2. An error `e` in the model output is an error
    `s_t e` in x0_hat (`x0_hat`: s = sigma/alpha for eps, sigma for v and for flows, 1 for x0), so the weight of the
    squared output error is `min(SNR, gamma) s^2`: min(1, gamma / SNR) for eps, min(SNR, gamma) / (SNR + 1) for v
    (alpha^2 + sigma^2 = 1), min(alpha^2, gamma sigma^2) for flows, min(SNR, gamma) for x0 (gamma where sigma = 0).

    References:
      Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023, Eq. 8 and section 3.4.
    """
    alpha, sigma = self.alpha_sigma(t)
    a2, s2 = jnp.square(alpha), jnp.square(sigma)
    if self.name == 'ddpm_eps':  # min(SNR, g) / SNR; alpha > 0 (eps excludes zero terminal SNR)
      return jnp.minimum(1.0, gamma * s2 / a2)
    if self.name == 'ddpm_x0':
      return jnp.where(s2 > 0, jnp.minimum(a2 / jnp.where(s2 > 0, s2, 1.0), gamma), gamma)
    return jnp.minimum(a2, gamma * s2)  # v and flows: min(SNR, g) * sigma^2

  def loss(self, pred: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """Per-sample diffusion loss `[B]`: mean squared error to the target over all but the batch axis, in float32."""
    err = jnp.square(pred.astype(jnp.float32) - self.target(x0, eps, t).astype(jnp.float32))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def get_formulation(
  name: str,
  *,
  schedule: str = 'scaled_linear',
  num_steps: int = 1000,
  beta_start: float = 0.00085,
  beta_end: float = 0.012,
  zero_terminal_snr: bool = False,
) -> Formulation:
  """A formulation; the schedule arguments apply to the DDPM ones (see `get_schedule`)."""
  if name not in FORMULATIONS:
    raise ValueError(f'unknown formulation {name!r}; known: {FORMULATIONS}.')
  if name == 'flow_ot':
    return Formulation(name)
  if name == 'ddpm_eps' and zero_terminal_snr:
    # alpha_T = 0: the last step's x0 estimate from an eps prediction divides by zero (Lin et al. use v).
    raise ValueError('zero_terminal_snr needs a velocity (ddpm_v) or sample (ddpm_x0) formulation, not ddpm_eps.')
  return Formulation(
    name,
    get_schedule(
      schedule, num_steps=num_steps, beta_start=beta_start, beta_end=beta_end, zero_terminal_snr=zero_terminal_snr
    ),
  )
