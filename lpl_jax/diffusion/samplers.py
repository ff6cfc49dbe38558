"""Samplers as single compiled loops (`lax.scan`): DDIM (eta >= 0), DDPM ancestral, and Euler / Heun / RK4 ODE
solvers for flows; classifier-free guidance; deterministic given a key.

`model_fn(x, model_time [B], y [B] | None) -> prediction` is any denoiser (closed over its params). The time grids
are static NumPy arrays built on the host (as diffusers' `set_timesteps`); the loop body is one compiled step.
With a learned-sigma formulation the model output has `2C` channels (prediction, variance values): the DDPM sampler
uses the learned variance, DDIM only the prediction, and every sampler returns `C` channels like `x_init`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax.diffusion.formulations import Formulation, _bcast, learned_range_log_variance, posterior_mean_variance

SAMPLERS = ('ddim', 'ddpm', 'euler', 'heun', 'rk4')
SPACINGS = ('leading', 'trailing', 'linspace')
ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
_VAR_FLOOR = 1e-20  # diffusers' floor of the posterior variance (0 at the last step) before its sqrt or log


def ddpm_timesteps(num_train: int, num_steps: int, spacing: str = 'leading', steps_offset: int = 0) -> np.ndarray:
  """Descending inference timesteps, exactly as diffusers' DDIM/DDPM `set_timesteps`."""
  if not 1 <= num_steps <= num_train:
    raise ValueError(f'num_steps={num_steps} must be in [1, {num_train}] (the training timesteps).')
  if spacing == 'leading':
    t = (np.arange(num_steps) * (num_train // num_steps)).round()[::-1].astype(np.int64) + steps_offset
  elif spacing == 'trailing':
    t = np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
  elif spacing == 'linspace':
    t = np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
  else:
    raise ValueError(f'unknown timestep spacing {spacing!r}; known: {SPACINGS}.')
  return t.copy()


def flow_sigmas(num_steps: int, *, shift: float = 1.0, num_train: int = 1000) -> np.ndarray:
  """`[num_steps + 1]` descending flow times from 1 to 1/num_train, SD3-shifted, then 0 (diffusers'
  FlowMatchEulerDiscreteScheduler grid for shift 1)."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  t = np.linspace(1.0, 1.0 / num_train, num_steps)
  t = shift * t / (1 + (shift - 1) * t)
  return np.append(t, 0.0)


def classifier_free_guidance(
  model_fn: ModelFn, guidance_scale: float, null_class: int, *, learn_sigma: bool = False
) -> ModelFn:
  """`uncond + scale * (cond - uncond)`, both halves in one batched call; scale 1 is the conditional call alone.

  With `learn_sigma` the output is `[B, ..., 2C]` for `x [B, ..., C]`: only the `C` prediction channels are guided
  and the variance channels are the conditional ones, as diffusers' `DiTPipeline` and DiT's `forward_with_cfg` do.
  """
  if guidance_scale == 1.0:
    return model_fn

  def guided(x, t, y):
    both = model_fn(
      jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, null_class)])
    )
    cond, uncond = jnp.split(both, 2)
    if not learn_sigma:
      return uncond + guidance_scale * (cond - uncond)
    # All C prediction channels are guided, as diffusers does. DiT's official forward_with_cfg guides only the first
    # 3 channels, a quirk it keeps for exact reproducibility of its numbers, not the guidance rule itself.
    c = x.shape[-1]
    pred = uncond[..., :c] + guidance_scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([pred, cond[..., c:]], axis=-1)

  return guided


def ddim_step(
  formulation: Formulation,
  x: jax.Array,
  pred: jax.Array,
  t: jax.Array,
  alpha_prev: jax.Array,
  sigma_prev: jax.Array,
  *,
  eta: float = 0.0,
  noise: jax.Array | None = None,
) -> jax.Array:
  """One DDIM update from time t to the previous grid point with `(alpha_prev, sigma_prev)` (Song et al. 2021).

  `x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - std^2) eps_hat + std noise`, with
  `std^2 = eta^2 (sigma_t^2 - (alpha_t / alpha_prev)^2 sigma_prev^2) sigma_prev^2 / sigma_t^2`, the posterior
  variance written for any (alpha, sigma); for DDPM it is diffusers' `_get_variance`.
  """
  alpha_t, sigma_t = formulation.alpha_sigma(t)
  x0, eps = formulation.x0_hat(x, pred, t), formulation.eps_hat(x, pred, t)
  var = (sigma_t**2 - (alpha_t / alpha_prev) ** 2 * sigma_prev**2) * sigma_prev**2 / sigma_t**2
  std = eta * jnp.sqrt(jnp.maximum(var, 0.0))
  out = _bcast(alpha_prev, x) * x0 + _bcast(jnp.sqrt(jnp.maximum(sigma_prev**2 - std**2, 0.0)), x) * eps
  if eta > 0:
    out = out + _bcast(std, x) * noise
  return out


def ddpm_step(
  formulation: Formulation, x: jax.Array, pred: jax.Array, t: jax.Array, t_prev: jax.Array, noise: jax.Array
) -> jax.Array:
  """One ancestral step of the DDPM posterior q(x_prev | x_t, x0_hat) from `x [B, ..., C]`, as diffusers'
  DDPMScheduler; `t_prev < 0` is the final step (alpha_bar_prev = 1); no noise at t = 0.

  The variance is the fixed-small beta_tilde (Ho et al. 2020), or with `formulation.learn_sigma` (`pred
  [B, ..., 2C]`) the learned one between beta_tilde and beta of this step (diffusers' `variance_type=
  'learned_range'`; beta_tilde floored at 1e-20 before its log as there). Both use the betas of the step actually
  taken, `1 - alpha_bar_t / alpha_bar_prev`, as DiT's respaced process does on a strided grid.

  References:
    Ho et al. 2020, Algorithm 2 and Eq. 7; Nichol & Dhariwal 2021, Eq. 15.
  """
  if formulation.learn_sigma and pred.shape[-1] != 2 * x.shape[-1]:
    raise ValueError(f'a learn_sigma model output needs 2C = {2 * x.shape[-1]} channels, got shape {pred.shape}.')
  ac = jnp.asarray(formulation.alphas_cumprod, jnp.float32)
  a_t = ac[t]
  a_prev = jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], 1.0)
  mean, var = posterior_mean_variance(formulation.x0_hat(x, pred, t), x, a_t, a_prev)
  var = jnp.maximum(var, _VAR_FLOOR)
  _, var_values = formulation.split(pred)
  if var_values is None:
    std = _bcast(jnp.sqrt(var), x)
  else:
    log_beta = jnp.log(1 - a_t / a_prev)
    std = jnp.exp(0.5 * learned_range_log_variance(var_values, _bcast(log_beta, x), _bcast(jnp.log(var), x)))
  return mean + _bcast(t > 0, x) * std * noise


def sample(
  model_fn: ModelFn,
  formulation: Formulation,
  x_init: jax.Array,
  key: jax.Array,
  *,
  sampler: str = 'ddim',
  num_steps: int = 50,
  eta: float = 0.0,
  guidance_scale: float = 1.0,
  y: jax.Array | None = None,
  null_class: int | None = None,
  timestep_spacing: str = 'leading',
  steps_offset: int = 0,
  set_alpha_to_one: bool = True,
  shift: float = 1.0,
) -> jax.Array:
  """Runs a sampler from `x_init` (pure noise, `[B, ...]`) to a clean sample, in one `lax.scan`.

  Args:
    model_fn: `(x, model_time, y) -> prediction` in the formulation's parametrisation (`2C` channels with
      `formulation.learn_sigma`: prediction, then the variance values).
    formulation: from `get_formulation`.
    x_init: the starting noise.
    key: PRNG key for the stochastic samplers (DDIM with eta > 0, DDPM).
    sampler: `'ddim'`, `'ddpm'` (DDPM formulations), `'euler'`, `'heun'`, `'rk4'` (flows).
    num_steps: number of model evaluations' steps.
    eta: DDIM stochasticity (0 = deterministic).
    guidance_scale: classifier-free guidance scale; != 1 needs `y` and `null_class`.
    timestep_spacing, steps_offset, set_alpha_to_one: diffusers' grid options for the DDPM formulations.
    shift: SD3 time shift of the flow grid.

  Returns:
    The sample, shaped like `x_init`.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; known: {SAMPLERS}.')
  if formulation.is_flow and sampler == 'ddpm':
    raise ValueError("the 'ddpm' ancestral sampler needs a DDPM formulation, not flow_ot.")
  if not formulation.is_flow and sampler in ('euler', 'heun', 'rk4'):
    raise ValueError(f'the {sampler!r} ODE sampler integrates flow velocities; use ddim/ddpm for {formulation.name!r}.')
  if guidance_scale != 1.0:
    if y is None or null_class is None:
      raise ValueError('classifier-free guidance (guidance_scale != 1) needs labels y and the null_class id.')
    model_fn = classifier_free_guidance(model_fn, guidance_scale, null_class, learn_sigma=formulation.learn_sigma)
  batch = x_init.shape[0]

  def call(x, t):
    return model_fn(x, jnp.full((batch,), formulation.model_time(t), jnp.float32), y)

  if formulation.is_flow:
    grid = flow_sigmas(num_steps, shift=shift, num_train=formulation.num_timesteps).astype(np.float32)
    cur, nxt = grid[:-1], grid[1:]
  else:
    cur = ddpm_timesteps(formulation.num_timesteps, num_steps, timestep_spacing, steps_offset)
    if sampler == 'ddpm':  # the next point of the grid, as diffusers' DDPMScheduler (DiT's respacing with linspace)
      nxt = np.append(cur[1:], -1)
    else:  # DDIM steps back by T // num_steps whatever the spacing, as diffusers' DDIMScheduler
      nxt = cur - formulation.num_timesteps // num_steps
  keys = jax.random.split(key, len(cur))

  if sampler in ('ddim', 'ddpm') and not formulation.is_flow:
    a_final, s_final = (1.0, 0.0) if set_alpha_to_one else tuple(float(v) for v in formulation.alpha_sigma(0))

  def body(x, inputs):
    t, t_next, k = inputs
    noise = jax.random.normal(k, x.shape, x.dtype)
    if sampler == 'ddpm':
      return ddpm_step(formulation, x, call(x, t), t, t_next, noise), None
    if sampler == 'ddim':
      if formulation.is_flow:
        a_prev, s_prev = formulation.alpha_sigma(t_next)
      else:
        a, s = formulation.alpha_sigma(jnp.maximum(t_next, 0))
        a_prev, s_prev = jnp.where(t_next >= 0, a, a_final), jnp.where(t_next >= 0, s, s_final)
      return ddim_step(formulation, x, call(x, t), t, a_prev, s_prev, eta=eta, noise=noise), None
    h = t_next - t
    v1 = call(x, t)
    if sampler == 'euler':
      return x + h * v1, None
    if sampler == 'heun':
      return x + h / 2 * (v1 + call(x + h * v1, t_next)), None
    v2 = call(x + h / 2 * v1, t + h / 2)
    v3 = call(x + h / 2 * v2, t + h / 2)
    v4 = call(x + h * v3, t_next)
    return x + h / 6 * (v1 + 2 * v2 + 2 * v3 + v4), None

  out, _ = jax.lax.scan(body, x_init, (jnp.asarray(cur), jnp.asarray(nxt), keys))
  return out
