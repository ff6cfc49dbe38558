"""Schedules against diffusers' DDPMScheduler; formulations' algebra; timestep samplers and stratification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from diffusers import DDPMScheduler

from lpl_jax import diffusion


@pytest.mark.parametrize(
  'name,diffusers_name,beta_start,beta_end',
  [
    ('scaled_linear', 'scaled_linear', 0.00085, 0.012),
    ('linear', 'linear', 1e-4, 0.02),
    ('cosine', 'squaredcos_cap_v2', 0.00085, 0.012),
  ],
)
@pytest.mark.parametrize('zero_terminal_snr', [False, True])
def test_schedules_match_diffusers(name, diffusers_name, beta_start, beta_end, zero_terminal_snr):
  reference = DDPMScheduler(
    beta_schedule=diffusers_name, beta_start=beta_start, beta_end=beta_end, rescale_betas_zero_snr=zero_terminal_snr
  ).alphas_cumprod.numpy()
  ours = diffusion.get_schedule(name, beta_start=beta_start, beta_end=beta_end, zero_terminal_snr=zero_terminal_snr)
  assert ours.shape == (1000,)
  np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
  if zero_terminal_snr:
    assert ours[-1] == 0.0


def test_schedule_errors():
  with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
    diffusion.get_schedule('quadratic')
  with pytest.raises(ValueError, match='betas outside'):
    diffusion.get_schedule('linear', beta_start=0.5, beta_end=1.5)
  with pytest.raises(ValueError, match="unknown formulation 'ddpm_score'"):
    diffusion.get_formulation('ddpm_score')
  with pytest.raises(ValueError, match='zero_terminal_snr needs a velocity'):
    diffusion.get_formulation('ddpm_eps', zero_terminal_snr=True)


FORMS = [('ddpm_eps', {}), ('ddpm_v', {}), ('ddpm_v', {'zero_terminal_snr': True}), ('ddpm_x0', {}), ('flow_ot', {})]


@pytest.mark.parametrize('name,kwargs', FORMS)
def test_exact_target_recovers_x0_at_every_t(name, kwargs):
  form = diffusion.get_formulation(name, **kwargs)
  rng = np.random.default_rng(0)
  n = 1000 if not form.is_flow else 101
  t = jnp.arange(n) if not form.is_flow else jnp.linspace(0.0, 1.0, n)
  x0 = jnp.asarray(rng.normal(size=(n, 4, 4, 2)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(n, 4, 4, 2)), jnp.float32)
  x_t = jax.jit(form.add_noise)(x0, eps, t)
  target = form.target(x0, eps, t)
  x0_hat = jax.jit(form.x0_hat)(x_t, target, t)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(form.loss(target, x0, eps, t), np.zeros(n))
  # eps_hat recovers the noise wherever it is identifiable (sigma_t > 0 for x0-prediction).
  ok = np.asarray(form.alpha_sigma(t)[1]) > 1e-2 if name == 'ddpm_x0' else np.ones(n, bool)
  np.testing.assert_allclose(np.asarray(form.eps_hat(x_t, target, t))[ok], np.asarray(eps)[ok], atol=1e-4)


def test_table_1_formulas():
  """Paper Table 1, written out on a single example: alpha, sigma and x0_hat for each framework."""
  ac = diffusion.get_schedule('scaled_linear')
  x_t, d = jnp.array([[0.3]]), jnp.array([[-0.7]])
  a, s = np.sqrt(ac[500]), np.sqrt(1 - ac[500])
  t = jnp.array([500])
  np.testing.assert_allclose(diffusion.get_formulation('ddpm_eps').x0_hat(x_t, d, t), (0.3 + s * 0.7) / a, rtol=1e-6)
  np.testing.assert_allclose(diffusion.get_formulation('ddpm_v').x0_hat(x_t, d, t), a * 0.3 + s * 0.7, rtol=1e-6)
  flow = diffusion.get_formulation('flow_ot')
  np.testing.assert_allclose(flow.alpha_sigma(jnp.array([0.25])), [[0.75], [0.25]])
  np.testing.assert_allclose(flow.x0_hat(x_t, d, jnp.array([0.25])), 0.3 + 0.25 * 0.7, rtol=1e-6)
  np.testing.assert_allclose(flow.model_time(jnp.array([0.25])), [250.0])


def test_noise_level():
  form = diffusion.get_formulation('ddpm_v', zero_terminal_snr=True)
  levels = np.asarray(form.noise_level(jnp.arange(1000)))
  assert np.all(np.diff(levels[:-1]) > 0) and np.isinf(levels[-1])


SAMPLER_CASES = [
  (diffusion.TimestepSampler(num_timesteps=1000), 'ddpm_eps'),
  (diffusion.TimestepSampler('logit_normal'), 'flow_ot'),
  (diffusion.TimestepSampler('mode', mode_scale=1.29), 'flow_ot'),
  (diffusion.TimestepSampler('logit_normal', shift=diffusion.resolution_shift(512)), 'flow_ot'),
]


@pytest.mark.parametrize('sampler,name', SAMPLER_CASES)
def test_stratified_sampler_keeps_the_marginal(sampler, name):
  form = diffusion.get_formulation(name)
  batch, threshold = 16, 3.0
  k = sampler.split(form, threshold, batch)
  assert 0 < k < batch
  draw = jax.jit(jax.vmap(lambda key: sampler.sample_stratified(key, batch, k)))
  strat = np.asarray(draw(jax.random.split(jax.random.key(0), 2000)))
  plain = np.asarray(jax.jit(lambda key: sampler.sample(key, 2000 * batch))(jax.random.key(1)))
  levels = np.asarray(form.noise_level(jnp.asarray(strat)))
  assert np.all(levels[:, :k] <= threshold), 'rows [:K] must always be below the threshold'
  # Rows [K:] cover u in (K/B, 1): the part of it above u* is above the threshold (K = floor(u* B) gives up the
  # sliver between K/B and u*).
  mass = sampler.mass_below(form, threshold)
  assert k == int(np.floor(mass * batch))
  np.testing.assert_allclose(np.mean(levels[:, k:] > threshold), (1 - mass) / (1 - k / batch), atol=0.02)
  p_value = scipy.stats.ks_2samp(strat.ravel(), plain).pvalue
  assert p_value > 0.01, p_value


def test_sampler_distributions():
  """Logit-normal and mode sampling against their definitions (SD3, Esser et al. 2024)."""
  key = jax.random.key(2)
  t = np.asarray(diffusion.TimestepSampler('logit_normal', logit_mean=0.5, logit_std=1.2).sample(key, 50000))
  logits = np.log(t / (1 - t))
  assert scipy.stats.kstest(logits, 'norm', args=(0.5, 1.2)).pvalue > 0.01
  u = np.random.default_rng(3).uniform(size=50000)
  mode = 1 - u - 1.29 * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)
  ours = np.asarray(diffusion.TimestepSampler('mode', mode_scale=1.29).sample(key, 50000))
  assert scipy.stats.ks_2samp(ours, mode).pvalue > 0.01
  shifted = np.asarray(diffusion.TimestepSampler('uniform', shift=3.0).sample(key, 50000))
  assert scipy.stats.ks_2samp(shifted, 3 * u / (1 + 2 * u)).pvalue > 0.01
  ddpm = np.asarray(diffusion.TimestepSampler(num_timesteps=1000).sample(key, 50000))
  assert ddpm.dtype == np.int32 and ddpm.min() >= 0 and ddpm.max() <= 999


def test_timestep_sampler_errors():
  with pytest.raises(ValueError, match="unknown timestep sampler 'beta'"):
    diffusion.TimestepSampler('beta')
  with pytest.raises(ValueError, match='non-monotone'):
    diffusion.TimestepSampler('mode', mode_scale=3.0)
  with pytest.raises(ValueError, match='does not match formulation'):
    diffusion.TimestepSampler().split(diffusion.get_formulation('ddpm_eps'), 5.0, 8)
