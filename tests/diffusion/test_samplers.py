"""Samplers against diffusers' schedulers for the same (stand-in) model outputs; ODE solvers on an exact flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lpl_jax import diffusion

SHAPE = (2, 4, 4, 3)


def stand_in_jax(x, t, y=None):
  """A fixed nonlinear 'model' of x and the model time (identical formula in PyTorch below)."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  return 0.8 * x * jnp.cos(3 * t) + 0.3 * jnp.sin(2 * x + t)


def stand_in_torch(x, t):
  t = float(t) / 1000.0
  return 0.8 * x * np.cos(3 * t) + 0.3 * torch.sin(2 * x + t)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nchw(x):
  return torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())


def _nhwc(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


DIFFUSERS_PRED = {'ddpm_eps': 'epsilon', 'ddpm_v': 'v_prediction'}


@pytest.mark.parametrize(
  'name,spacing,offset,ztsnr',
  [
    ('ddpm_eps', 'leading', 0, False),
    ('ddpm_eps', 'leading', 1, False),
    ('ddpm_v', 'trailing', 0, True),
    ('ddpm_v', 'leading', 0, False),
  ],
)
def test_ddim_trajectory_matches_diffusers(name, spacing, offset, ztsnr):
  form = diffusion.get_formulation(name, zero_terminal_snr=ztsnr)
  sched = DDIMScheduler(
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type=DIFFUSERS_PRED[name],
    timestep_spacing=spacing,
    steps_offset=offset,
    rescale_betas_zero_snr=ztsnr,
    set_alpha_to_one=True,
  )
  sched.set_timesteps(50)
  np.testing.assert_array_equal(diffusion.ddpm_timesteps(1000, 50, spacing, offset), sched.timesteps.numpy())
  x_init = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)

  x = _nchw(x_init)
  first = None
  for t in sched.timesteps:
    x = sched.step(stand_in_torch(x, t), t, x).prev_sample
    first = _nhwc(x) if first is None else first
  out = jax.jit(
    lambda x: diffusion.sample(
      stand_in_jax,
      form,
      x,
      jax.random.key(0),
      sampler='ddim',
      num_steps=50,
      timestep_spacing=spacing,
      steps_offset=offset,
    )
  )(x_init)
  one = jax.jit(
    lambda x: diffusion.sample(
      stand_in_jax,
      form,
      x,
      jax.random.key(0),
      sampler='ddim',
      num_steps=1,
      timestep_spacing=spacing,
      steps_offset=offset,
    )
  )
  assert rel(out, _nhwc(x)) <= 1e-4
  # One DDIM step, directly.
  t0 = int(sched.timesteps[0])
  a_prev, s_prev = form.alpha_sigma(jnp.array(t0 - 20))
  step = diffusion.ddim_step(
    form, jnp.asarray(x_init), stand_in_jax(jnp.asarray(x_init), jnp.full((2,), t0)), jnp.array(t0), a_prev, s_prev
  )
  assert rel(step, first) <= 1e-5
  assert one(x_init).shape == SHAPE


def test_ddim_eta_step_matches_diffusers():
  form = diffusion.get_formulation('ddpm_eps')
  sched = DDIMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, clip_sample=False)
  sched.set_timesteps(50)
  rng = np.random.default_rng(1)
  x, noise = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(2))
  t = 500
  expected = sched.step(stand_in_torch(_nchw(x), t), t, _nchw(x), eta=0.7, variance_noise=_nchw(noise)).prev_sample
  a_prev, s_prev = form.alpha_sigma(jnp.array(t - 20))
  ours = diffusion.ddim_step(
    form,
    jnp.asarray(x),
    stand_in_jax(jnp.asarray(x), jnp.full((2,), t)),
    jnp.array(t),
    a_prev,
    s_prev,
    eta=0.7,
    noise=jnp.asarray(noise),
  )
  assert rel(ours, _nhwc(expected)) <= 1e-5


@pytest.mark.parametrize('name', ['ddpm_eps', 'ddpm_v'])
def test_ddpm_ancestral_trajectory_matches_diffusers(name):
  """Same noise on both sides: diffusers draws it with torch.randn(generator); the test replays those draws."""
  form = diffusion.get_formulation(name)
  sched = DDPMScheduler(
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type=DIFFUSERS_PRED[name],
  )
  sched.set_timesteps(20)
  x_init = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
  gen, replay = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
  x, ours = _nchw(x_init), jnp.asarray(x_init)
  for t in sched.timesteps:
    x = sched.step(stand_in_torch(x, t), t, x, generator=gen).prev_sample
    noise = jnp.asarray(_nhwc(torch.randn(x.shape, generator=replay))) if t > 0 else jnp.zeros(SHAPE)
    ours = diffusion.ddpm_step(
      form, ours, stand_in_jax(ours, jnp.full((2,), int(t))), jnp.array(int(t)), jnp.array(int(t) - 50), noise
    )
  assert rel(ours, _nhwc(x)) <= 1e-4


def test_flow_euler_matches_diffusers():
  form = diffusion.get_formulation('flow_ot')
  sched = FlowMatchEulerDiscreteScheduler()
  sched.set_timesteps(28)
  np.testing.assert_allclose(diffusion.flow_sigmas(28), sched.sigmas.numpy(), atol=1e-6)
  x_init = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
  x = _nchw(x_init)
  for t in sched.timesteps:
    x = sched.step(stand_in_torch(x, t), t, x).prev_sample
  out = jax.jit(lambda x: diffusion.sample(stand_in_jax, form, x, jax.random.key(0), sampler='euler', num_steps=28))(
    x_init
  )
  assert rel(out, _nhwc(x)) <= 1e-5
  # DDIM on a flow is the same first-order update.
  ddim = diffusion.sample(stand_in_jax, form, jnp.asarray(x_init), jax.random.key(0), sampler='ddim', num_steps=28)
  assert rel(ddim, out) <= 1e-5


def test_ode_solvers_converge_with_their_order():
  """On a nonlinear ODE dx/dt = sin(x) cos(3t) + t (reference solution by scipy at rtol 1e-12), doubling the steps
  divides the error by ~2 for Euler, ~4 for Heun and ~16 for RK4 (RK4 at 8 -> 16 steps: by 32 steps it nears the
  float32 resolution of the time grid)."""
  import scipy.integrate

  form = diffusion.get_formulation('flow_ot')

  def field(x, model_t, y=None):
    t = (model_t / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sin(x) * jnp.cos(3 * t) + t

  x1 = 0.5
  ref = scipy.integrate.solve_ivp(
    lambda t, x: np.sin(x) * np.cos(3 * t) + t, (1.0, 0.0), [x1], rtol=1e-12, atol=1e-12
  ).y[0, -1]
  orders, final = {}, {}
  with jax.enable_x64(True):
    for sampler in ('euler', 'heun', 'rk4'):
      errs = []
      for n in (8, 16) if sampler == 'rk4' else (16, 32):
        out = diffusion.sample(
          field, form, jnp.full((1, 1), x1, jnp.float64), jax.random.key(0), sampler=sampler, num_steps=n
        )
        errs.append(abs(float(out[0, 0]) - ref))
      orders[sampler], final[sampler] = np.log2(errs[0] / errs[1]), errs[1]
  assert 0.8 < orders['euler'] < 1.3 and 1.7 < orders['heun'] < 2.4 and 3.3 < orders['rk4'] < 4.7, orders
  assert final['heun'] < final['euler'], final


def test_guidance():
  def model(x, t, y):
    return x * 0 + y.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))

  x, t, y = jnp.ones((2, 3)), jnp.zeros(2), jnp.array([2, 5])
  assert diffusion.classifier_free_guidance(model, 1.0, null_class=10) is model
  np.testing.assert_allclose(
    diffusion.classifier_free_guidance(model, 1.5, 10)(x, t, y),
    np.array([[10 + 1.5 * (2 - 10)] * 3, [10 + 1.5 * (5 - 10)] * 3]),
  )
  form = diffusion.get_formulation('ddpm_eps')
  cond = diffusion.sample(stand_in_jax, form, x, jax.random.key(0), num_steps=5, y=y)
  scale1 = diffusion.sample(
    stand_in_jax, form, x, jax.random.key(0), num_steps=5, y=y, guidance_scale=1.0, null_class=10
  )
  np.testing.assert_array_equal(cond, scale1)


def test_stochastic_samplers_are_deterministic_given_a_key():
  form = diffusion.get_formulation('ddpm_eps')
  x = jnp.asarray(np.random.default_rng(5).normal(size=SHAPE), jnp.float32)
  run = jax.jit(lambda x, k: diffusion.sample(stand_in_jax, form, x, k, sampler='ddpm', num_steps=10))
  a, b, c = run(x, jax.random.key(1)), run(x, jax.random.key(1)), run(x, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  eta = jax.jit(lambda x, k: diffusion.sample(stand_in_jax, form, x, k, sampler='ddim', eta=1.0, num_steps=10))
  np.testing.assert_array_equal(eta(x, jax.random.key(3)), eta(x, jax.random.key(3)))


def test_sampler_errors():
  x = jnp.ones(SHAPE)
  flow, ddpm = diffusion.get_formulation('flow_ot'), diffusion.get_formulation('ddpm_eps')
  with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
    diffusion.sample(stand_in_jax, ddpm, x, jax.random.key(0), sampler='dpm')
  with pytest.raises(ValueError, match='needs a DDPM formulation'):
    diffusion.sample(stand_in_jax, flow, x, jax.random.key(0), sampler='ddpm')
  with pytest.raises(ValueError, match='integrates flow velocities'):
    diffusion.sample(stand_in_jax, ddpm, x, jax.random.key(0), sampler='heun')
  with pytest.raises(ValueError, match='needs labels y and the null_class'):
    diffusion.sample(stand_in_jax, ddpm, x, jax.random.key(0), guidance_scale=2.0)
  with pytest.raises(ValueError, match='num_steps=2000 must be in'):
    diffusion.sample(stand_in_jax, ddpm, x, jax.random.key(0), num_steps=2000)
  with pytest.raises(ValueError, match="unknown timestep spacing 'log'"):
    diffusion.sample(stand_in_jax, ddpm, x, jax.random.key(0), timestep_spacing='log')
