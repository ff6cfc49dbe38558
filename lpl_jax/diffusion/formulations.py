"""Diffusion formulations behind one interface: DDPM-eps, DDPM-v, DDPM-x0 and Flow-OT.

Every one writes `x_t = alpha_t x0 + sigma_t eps` (paper Table 1) and gives the training target, the per-sample
diffusion loss and the estimate `x0_hat` (and `eps_hat`) from a model output. Time `t` is an integer timestep in
[0, T) for DDPM and a float in [0, 1] for flows; the denoiser sees `model_time(t)`, in [0, T) for both (flows:
t * 1000, as SD3), so one timestep embedding serves every formulation.

The DDPM formulations can also learn the reverse-process variance (improved DDPM, `learn_sigma=True`): the model
output then has `2C` channels, the prediction and the variance interpolation values, and the loss adds the
variational bound term that trains the latter (`Formulation.loss`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax.diffusion.schedules import get_schedule

FORMULATIONS = ('ddpm_eps', 'ddpm_v', 'ddpm_x0', 'flow_ot')
FLOW_TIME_SCALE = 1000.0
_TINY = 1e-12  # floor of alpha_t in divisions (zero-terminal-SNR eps models at the last step)
_LOG2 = math.log(2.0)
_CDF_FLOOR = 1e-12  # floor of the bin probabilities before their log (the official code's clamp)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def posterior_mean_coefs(ac_t, ac_prev):
  """`(c_x0, c_xt)` of the posterior mean `mu = c_x0 x0 + c_xt x_t` of q(x_prev | x_t, x0) for the step from
  alpha_bar_prev to alpha_bar_t, whose beta is `1 - ac_t / ac_prev`: `c_x0 = sqrt(ac_prev) beta / (1 - ac_t)`,
  `c_xt = sqrt(ac_t / ac_prev) (1 - ac_prev) / (1 - ac_t)`. NumPy or JAX arrays of any (equal) shape.

  References:
    Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, Eq. 7.
    Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021, Eq. 11.
  """
  alpha_step = ac_t / ac_prev
  return ac_prev**0.5 * (1 - alpha_step) / (1 - ac_t), alpha_step**0.5 * (1 - ac_prev) / (1 - ac_t)


def posterior_variance(ac_t, ac_prev):
  """beta_tilde, the variance of q(x_prev | x_t, x0): `(1 - ac_prev) / (1 - ac_t) beta`, beta = 1 - ac_t / ac_prev;
  0 at the first step (ac_prev = 1).

  References:
    Ho et al. 2020, Eq. 7; Nichol & Dhariwal 2021, Eq. 10.
  """
  return (1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)


def posterior_mean_variance(x0: jax.Array, x_t: jax.Array, ac_t: jax.Array, ac_prev: jax.Array):
  """`(mean [B, ...], variance [B])` of q(x_prev | x_t, x0), from `alpha_bar [B]` at t and at the previous step.

  References:
    Ho et al. 2020, Eq. 6-7; Nichol & Dhariwal 2021, Eq. 10-11.
  """
  c_x0, c_xt = posterior_mean_coefs(ac_t, ac_prev)
  return _bcast(c_x0, x_t) * x0 + _bcast(c_xt, x_t) * x_t, posterior_variance(ac_t, ac_prev)


def learned_range_log_variance(var_values: jax.Array, log_beta: jax.Array, log_beta_tilde: jax.Array) -> jax.Array:
  """The learned log-variance `f log(beta_t) + (1 - f) log(beta_tilde_t)`, `f = (v + 1) / 2`: the model output `v`
  (nominally in [-1, 1]) interpolates between the two bounds of the reverse variance in log space. `log_beta` and
  `log_beta_tilde` broadcast against `var_values [B, ..., C]`.

  References:
    Nichol & Dhariwal 2021, Eq. 15 (the official code maps the output `v` in [-1, 1] to Eq. 15's v by (v + 1) / 2).
  """
  frac = (var_values + 1) / 2
  return frac * log_beta + (1 - frac) * log_beta_tilde


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting).

  References:
    Ho et al. 2020, Eq. 5 (the KL terms L_{t-1} between Gaussians, in closed form).
  """
  return _normal_kl_of_differences(mean1 - mean2, logvar1 - logvar2, logvar2)


def _normal_kl_of_differences(mean_diff: jax.Array, logvar_diff: jax.Array, logvar2: jax.Array) -> jax.Array:
  """`normal_kl` from `mean1 - mean2` and `logvar1 - logvar2`: `(exp(d) - 1 - d + mean_diff^2 / var2) / 2`. Given
  the differences directly, float32 keeps their precision, which the difference of two O(1) means (or of two log
  variances near -9) loses at small t."""
  return 0.5 * (jnp.expm1(logvar_diff) - logvar_diff + jnp.square(mean_diff) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Phi(x) ~ (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2, the approximation of the official decoder likelihood,
  written as the identical `sigmoid(2 sqrt(2 / pi) (x + 0.044715 x^3))`, which float32 keeps accurate in the lower
  tail (1 + tanh cancels there).

  References:
    Page, "Approximations to the Cumulative Normal Function and its Inverse for Use on a Pocket Calculator", Applied
    Statistics 26(1), 1977.
  """
  return jax.nn.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """Elementwise log-probability (nats) of data `x` in [-1, 1] quantised to 256 bins of width 2/255, under
  N(means, exp(log_scales)^2): the mass of `x`'s bin, the edge bins extended to -inf (x < -0.999) and +inf
  (x > 0.999). Applied to latents, which are not quantised, it is the official code's behaviour kept as is.

  References:
    Ho et al. 2020, Eq. 13 (the discrete decoder L_0).
  """
  return _discretized_log_likelihood_centered(x, x - means, log_scales)


def _discretized_log_likelihood_centered(x: jax.Array, centered: jax.Array, log_scales: jax.Array) -> jax.Array:
  """`discretized_gaussian_log_likelihood` from `centered = x - means` (see `_normal_kl_of_differences` on why).

  Every probability is taken in the lower tail, where float32 keeps its relative precision (in the upper tail both
  CDFs round to 1): the approximation is odd-symmetric (Phi(-z) = 1 - Phi(z)), so a bin's mass is the same with
  `centered` mirrored to `-|centered|`, and 1 - Phi(z) is Phi(-z).
  """
  inv_std = jnp.exp(-log_scales)
  half_bin = 1.0 / 255.0
  log_cdf_plus = jnp.log(jnp.maximum(approx_standard_normal_cdf(inv_std * (centered + half_bin)), _CDF_FLOOR))
  one_minus_cdf_min = approx_standard_normal_cdf(-inv_std * (centered - half_bin))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(one_minus_cdf_min, _CDF_FLOOR))
  mirrored = -jnp.abs(centered)
  delta = approx_standard_normal_cdf(inv_std * (mirrored + half_bin)) - approx_standard_normal_cdf(
    inv_std * (mirrored - half_bin)
  )
  log_delta = jnp.log(jnp.maximum(delta, _CDF_FLOOR))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _step_tables(alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
  """Float64 per-timestep `[T]` tables of the one-step reverse process: beta_t = 1 - ac_t / ac_{t-1} (ac_{-1} = 1),
  the posterior mean coefficients, log beta_tilde clipped at t = 0 to its t = 1 value (beta_tilde_0 = 0), as the
  official code clips it, and log(beta / beta_tilde), small at large t, made here before float32 rounding."""
  ac = np.asarray(alphas_cumprod, np.float64)
  ac_prev = np.append(1.0, ac[:-1])
  c_x0, c_xt = posterior_mean_coefs(ac, ac_prev)
  var = posterior_variance(ac, ac_prev)
  log_beta, log_beta_tilde = np.log(1 - ac / ac_prev), np.log(np.append(var[1], var[1:]))
  return {
    'log_beta': log_beta,
    'c_x0': c_x0,
    'c_xt': c_xt,
    'log_beta_tilde': log_beta_tilde,
    'log_beta_ratio': log_beta - log_beta_tilde,
  }


@dataclasses.dataclass(frozen=True, eq=False)
class Formulation:
  """A diffusion/flow formulation. Build with `get_formulation`.

  Attributes:
    name: one of `FORMULATIONS`.
    alphas_cumprod: `[T]` schedule of the DDPM formulations (None for flows).
    learn_sigma: the model output is `[..., 2C]`: the prediction, then the values `v` of the learned variance
      (`learned_range_log_variance`); DDPM formulations only.
    vb_weight: weight of the variational bound term in `loss` with `learn_sigma` (improved DDPM's lambda; DiT and
      the official code use 1 with the loss in bits per dim).
  """

  name: str
  alphas_cumprod: np.ndarray | None = None
  learn_sigma: bool = False
  vb_weight: float = 1.0

  def __post_init__(self):
    if self.learn_sigma and self.is_flow:
      raise ValueError('learn_sigma (a learned reverse variance) needs a DDPM formulation, not flow_ot.')

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

  def split(self, pred: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """`(prediction [..., C], var_values [..., C])` of a learned-sigma output `[..., 2C]` (the official channel
    order), or `(pred, None)` without `learn_sigma`."""
    if not self.learn_sigma:
      return pred, None
    if pred.shape[-1] % 2:
      raise ValueError(f'a learn_sigma model output needs an even channel count (2C), got shape {pred.shape}.')
    return jnp.split(pred, 2, axis=-1)

  def _prediction(self, pred: jax.Array, x_t: jax.Array) -> jax.Array:
    """The prediction channels of `pred`: the first half of a `2C` learned-sigma output; a `C`-channel `pred` is
    taken as the prediction itself (so that callers holding either keep working)."""
    if not self.learn_sigma or pred.shape[-1] == x_t.shape[-1]:
      return pred
    if pred.shape[-1] != 2 * x_t.shape[-1]:
      raise ValueError(f'a learn_sigma model output needs 2C = {2 * x_t.shape[-1]} channels, got shape {pred.shape}.')
    return self.split(pred)[0]

  def x0_hat(self, x_t: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array:
    """The clean-sample estimate from the model output (paper Table 1); with `learn_sigma`, from its prediction
    half."""
    pred = self._prediction(pred, x_t)
    alpha, sigma = (_bcast(v, x_t) for v in self.alpha_sigma(t))
    if self.name == 'ddpm_eps':
      return (x_t - sigma * pred) / jnp.maximum(alpha, _TINY)
    if self.name == 'ddpm_v':
      return alpha * x_t - sigma * pred
    if self.name == 'flow_ot':
      return x_t - sigma * pred
    return pred

  def eps_hat(self, x_t: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array:
    """The noise estimate from the model output (its prediction half with `learn_sigma`)."""
    pred = self._prediction(pred, x_t)
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

  def _table(self, name: str, t: jax.Array) -> jax.Array:
    """`_step_tables`' `name` at the integer timesteps `t`, float32 (the tables are made in float64)."""
    return jnp.asarray(_step_tables(self.alphas_cumprod)[name], jnp.float32)[jnp.asarray(t, jnp.int32)]

  def _x0_error_scale(self, t: jax.Array) -> jax.Array:
    """`s_t [B]` with `x0_hat - x0 = s_t (prediction - target)` (x0_hat is linear in the prediction and gives x0 for
    the target): -sigma/alpha for eps, -sigma for v, 1 for x0. Made from float64 roots, as the official code makes
    its tables: sqrt(1 - ac) of a float32 ac near 1 loses ~4 digits at small t (`alpha_sigma` keeps that rounding,
    which is diffusers')."""
    ac = np.asarray(self.alphas_cumprod, np.float64)
    alpha, sigma = np.sqrt(ac), np.sqrt(1.0 - ac)
    scale = {'ddpm_eps': -sigma / np.maximum(alpha, _TINY), 'ddpm_v': -sigma, 'ddpm_x0': np.ones_like(ac)}[self.name]
    return jnp.asarray(scale, jnp.float32)[jnp.asarray(t, jnp.int32)]

  def posterior_mean_log_variance(self, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(mean [B, ...], log_variance [B])` of the one-step posterior q(x_{t-1} | x_t, x0), the log-variance clipped at
    t = 0 to its t = 1 value (DDPM formulations; float32 from float64 tables).

    References:
      Ho et al. 2020, Eq. 6-7; Nichol & Dhariwal 2021, Eq. 10-11.
    """
    mean = _bcast(self._table('c_x0', t), x_t) * x0 + _bcast(self._table('c_xt', t), x_t) * x_t
    return mean, self._table('log_beta_tilde', t)

  def model_log_variance(self, var_values: jax.Array, t: jax.Array) -> jax.Array:
    """The learned log-variance `[B, ..., C]` of p(x_{t-1} | x_t) from the variance half of the output and `t [B]`,
    between log beta_tilde_t (clipped at t = 0) and log beta_t.

    References:
      Nichol & Dhariwal 2021, Eq. 15.
    """
    log_beta, log_beta_tilde = (_bcast(self._table(k, t), var_values) for k in ('log_beta', 'log_beta_tilde'))
    return learned_range_log_variance(var_values, log_beta, log_beta_tilde)

  def vb_bits_per_dim(self, pred: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The variational bound term `[B]` of a learned-sigma output `pred [B, ..., 2C]` at `x_t = add_noise(x0, eps,
    t)`, in bits per dimension: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL
    -log p(x0 | x_1) at t = 0; p has the posterior mean of `x0_hat` and the learned variance. Gradients flow through
    both halves of `pred`; `loss` detaches the mean's half.

    References:
      Nichol & Dhariwal 2021, Eq. 4-6 (L_{t-1} and L_0), Eq. 15; Ho et al. 2020, Eq. 5 and 13.
    """
    if not self.learn_sigma:
      raise ValueError(f'vb_bits_per_dim needs a learn_sigma formulation; {self.name!r} has learn_sigma=False.')
    prediction, var_values = self.split(pred.astype(jnp.float32))
    x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
    # Everything is taken as a difference to the posterior's (mean, log-variance) rather than as the difference of
    # two O(1) means that differ by O(sigma_t), or of two log-variances near -9, with float64-made coefficients:
    # float32 then keeps ~1e-6 relative precision at small t. The means differ by c_x0 (x0_hat - x0).
    x0_err = _bcast(self._x0_error_scale(t), x0) * (prediction - self.target(x0, eps, t).astype(jnp.float32))
    mean_err = _bcast(self._table('c_x0', t), x0) * x0_err
    # Eq. 15 is log beta_tilde + frac log(beta / beta_tilde): the posterior's log-variance minus the model's is
    # -frac log(beta / beta_tilde).
    logvar_diff = -(var_values + 1) / 2 * _bcast(self._table('log_beta_ratio', t), x0)
    model_log_var = self.model_log_variance(var_values, t)
    kl = _mean_flat(_normal_kl_of_differences(-mean_err, logvar_diff, model_log_var)) / _LOG2
    # At t = 0 the posterior mean is x0 itself (c_x0 = 1, c_xt = 0): x0 minus the decoder's mean is -mean_err.
    nll = -_mean_flat(_discretized_log_likelihood_centered(x0, -mean_err, 0.5 * model_log_var)) / _LOG2
    return jnp.where(jnp.asarray(t) == 0, nll, kl)

  def loss_terms(self, pred: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(mse, vb)`, each per sample `[B]` in float32: the mean squared error of the prediction to the target over all
    but the batch axis, and with `learn_sigma` (`pred [B, ..., 2C]`) `vb_weight` times `vb_bits_per_dim` with the
    prediction half detached (zeros without it), so that the MSE trains only the prediction channels and the bound
    only the variance channels. A timestep weighting of the loss scales the MSE alone (`loss`).

    References:
      Nichol & Dhariwal 2021, section 3.1 (L_hybrid = L_simple + lambda L_vlb, the stop-gradient on the mean).
    """
    if self.learn_sigma and pred.shape[-1] != 2 * x0.shape[-1]:
      raise ValueError(f'a learn_sigma model output needs 2C = {2 * x0.shape[-1]} channels, got shape {pred.shape}.')
    prediction, var_values = self.split(pred)
    err = jnp.square(prediction.astype(jnp.float32) - self.target(x0, eps, t).astype(jnp.float32))
    mse = _mean_flat(err)
    if not self.learn_sigma:
      return mse, jnp.zeros_like(mse)
    frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
    return mse, self.vb_weight * self.vb_bits_per_dim(frozen, x0, eps, t)

  def loss(
    self, pred: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array, weights: jax.Array | None = None
  ) -> jax.Array:
    """Per-sample diffusion loss `[B]` in float32: `weights * mse + vb` of `loss_terms` (weights 1 when None).

    The weights (a timestep weighting such as Min-SNR) scale the MSE only: the variational bound trains the variance
    channels, whose gradient does not depend on the weighting of the mean's error, as in Hang et al.'s Min-SNR code
    on guided-diffusion, where the weight multiplies the `mse` term and the `vb` term is added unweighted.
    """
    mse, vb = self.loss_terms(pred, x0, eps, t)
    if weights is not None:
      mse = weights * mse
    return mse + vb if self.learn_sigma else mse


def get_formulation(
  name: str,
  *,
  schedule: str = 'scaled_linear',
  num_steps: int = 1000,
  beta_start: float = 0.00085,
  beta_end: float = 0.012,
  zero_terminal_snr: bool = False,
  learn_sigma: bool = False,
  vb_weight: float = 1.0,
) -> Formulation:
  """A formulation; the schedule arguments apply to the DDPM ones (see `get_schedule`), as do `learn_sigma` and
  `vb_weight` (see `Formulation`; learn_sigma with flow_ot is a ValueError)."""
  if name not in FORMULATIONS:
    raise ValueError(f'unknown formulation {name!r}; known: {FORMULATIONS}.')
  if name == 'flow_ot':
    return Formulation(name, learn_sigma=learn_sigma)
  if name == 'ddpm_eps' and zero_terminal_snr:
    # alpha_T = 0: the last step's x0 estimate from an eps prediction divides by zero (Lin et al. use v).
    raise ValueError('zero_terminal_snr needs a velocity (ddpm_v) or sample (ddpm_x0) formulation, not ddpm_eps.')
  return Formulation(
    name,
    get_schedule(
      schedule, num_steps=num_steps, beta_start=beta_start, beta_end=beta_end, zero_terminal_snr=zero_terminal_snr
    ),
    learn_sigma=learn_sigma,
    vb_weight=vb_weight,
  )
