"""Learned variance (improved DDPM, DiT's `learn_sigma`): the hybrid loss against an independent float64 NumPy
transcription of the official semantics, the learned-range DDPM step against diffusers' DDPMScheduler, and the
samplers and guidance on `2C`-channel outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lpl_jax import diffusion

T = 1000
SHAPE = (2, 4, 4, 3)  # [B, H, W, C]; model outputs have 2C channels
LOSS_SHAPE = (8, 4, 4, 3)


def dit_betas() -> np.ndarray:
  """DiT's `get_named_beta_schedule('linear', 1000)`: float64 linspace, no float32 rounding."""
  return np.linspace(1e-4, 0.02, T, dtype=np.float64)


def dit_form():
  return diffusion.get_formulation('ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02, learn_sigma=True)


# --- Independent float64 NumPy reference of the official learned-range loss ([B, ..., C] layout). ---


def np_normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def np_approx_cdf(x):
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_discretized_gaussian_log_likelihood(x, means, log_scales):
  inv_std = np.exp(-log_scales)
  cdf_plus = np_approx_cdf(inv_std * (x - means + 1.0 / 255.0))
  cdf_min = np_approx_cdf(inv_std * (x - means - 1.0 / 255.0))
  mid = np.log(np.clip(cdf_plus - cdf_min, 1e-12, None))
  low = np.log(np.clip(cdf_plus, 1e-12, None))
  high = np.log(np.clip(1.0 - cdf_min, 1e-12, None))
  return np.where(x < -0.999, low, np.where(x > 0.999, high, mid))


class NumpyLearnedRangeDiffusion:
  """q(x_{t-1} | x_t, x0), p(x_{t-1} | x_t) with LEARNED_RANGE variance and EPSILON mean, the bits-per-dim bound
  term and the MSE + vb training loss, in float64 from the betas (Ho et al. 2020; Nichol & Dhariwal 2021)."""

  def __init__(self, betas):
    self.betas = betas
    self.ac = np.cumprod(1.0 - betas)
    self.ac_prev = np.append(1.0, self.ac[:-1])
    self.post_var = betas * (1.0 - self.ac_prev) / (1.0 - self.ac)
    self.post_log_var_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
    self.coef_x0 = betas * np.sqrt(self.ac_prev) / (1.0 - self.ac)
    self.coef_xt = (1.0 - self.ac_prev) * np.sqrt(1.0 - betas) / (1.0 - self.ac)

  @staticmethod
  def _b(arr, t, ndim):
    return arr[t].reshape((-1,) + (1,) * (ndim - 1))

  def q_sample(self, x0, t, eps):
    return self._b(np.sqrt(self.ac), t, x0.ndim) * x0 + self._b(np.sqrt(1 - self.ac), t, x0.ndim) * eps

  def q_posterior_mean_variance(self, x0, x_t, t):
    n = x0.ndim
    mean = self._b(self.coef_x0, t, n) * x0 + self._b(self.coef_xt, t, n) * x_t
    return mean, self._b(self.post_var, t, n), self._b(self.post_log_var_clipped, t, n) + 0 * x0

  def target(self, x0, eps, t, kind):
    """eps (the official EPSILON), x0 (START_X), or v = alpha eps - sigma x0 (not in the official code)."""
    n = x0.ndim
    v = self._b(np.sqrt(self.ac), t, n) * eps - self._b(np.sqrt(1 - self.ac), t, n) * x0
    return {'eps': eps, 'x0': x0, 'v': v}[kind]

  def p_mean_variance(self, out, x_t, t, kind='eps'):
    c = x_t.shape[-1]
    pred, var_values = out[..., :c], out[..., c:]
    n = x_t.ndim
    min_log = self._b(self.post_log_var_clipped, t, n)
    max_log = self._b(np.log(self.betas), t, n)
    frac = (var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    if kind == 'eps':
      x0_hat = self._b(np.sqrt(1 / self.ac), t, n) * x_t - self._b(np.sqrt(1 / self.ac - 1), t, n) * pred
    elif kind == 'v':
      x0_hat = self._b(np.sqrt(self.ac), t, n) * x_t - self._b(np.sqrt(1 - self.ac), t, n) * pred
    else:
      x0_hat = pred
    mean, _, _ = self.q_posterior_mean_variance(x0_hat, x_t, t)
    return mean, log_var

  def vb_terms_bpd(self, out, x0, x_t, t, kind='eps'):
    axes = tuple(range(1, x0.ndim))
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
    mean, log_var = self.p_mean_variance(out, x_t, t, kind)
    kl = np.mean(np_normal_kl(true_mean, true_log_var, mean, log_var), axis=axes) / np.log(2.0)
    nll = -np.mean(np_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var), axis=axes) / np.log(2.0)
    return np.where(t == 0, nll, kl)

  def training_loss(self, out, x0, eps, t, kind='eps'):
    x_t = self.q_sample(x0, t, eps)
    target = self.target(x0, eps, t, kind)
    mse = np.mean((target - out[..., : x0.shape[-1]]) ** 2, axis=tuple(range(1, x0.ndim)))
    return mse + self.vb_terms_bpd(out, x0, x_t, t, kind)


def loss_inputs(seed=0):
  """Images quantised to 256 levels in [-1, 1] (the decoder bins), eps, a noisy eps prediction, v in [-1, 1]."""
  rng = np.random.default_rng(seed)
  x0 = rng.integers(0, 256, LOSS_SHAPE) / 127.5 - 1.0
  eps = rng.normal(size=LOSS_SHAPE)
  out = np.concatenate([eps + 0.3 * rng.normal(size=LOSS_SHAPE), rng.uniform(-1, 1, LOSS_SHAPE)], axis=-1)
  t = np.array([0, 0, 1, 2, 37, 500, 998, T - 1])
  return x0, eps, out, t


def test_linear_schedule_is_dits():
  """Our 'linear' betas are DiT's float64 linspace rounded to float32 (diffusers' way): within 1e-9."""
  form = dit_form()
  ac = form.alphas_cumprod
  betas = 1 - ac / np.append(1.0, ac[:-1])
  np.testing.assert_allclose(betas, dit_betas(), rtol=0, atol=1e-9)
  np.testing.assert_allclose(ac, np.cumprod(1 - dit_betas()), rtol=1e-6, atol=0)


def test_hybrid_loss_matches_numpy_reference():
  x0, eps, out, t = loss_inputs()
  ref = NumpyLearnedRangeDiffusion(dit_betas())
  expected = ref.training_loss(out, x0, eps, t)
  form = dit_form()
  f32 = (jnp.asarray(a, jnp.float32) for a in (out, x0, eps))
  ours = np.asarray(jax.jit(form.loss)(*f32, jnp.asarray(t)), np.float64)
  assert ours.shape == (LOSS_SHAPE[0],)
  np.testing.assert_allclose(ours, expected, rtol=1e-5)
  # The bound term alone (t = 0: decoder NLL; t > 0: KL), from the same x_t.
  x_t = ref.q_sample(x0, t, eps)
  vb = jax.jit(form.vb_bits_per_dim)(*(jnp.asarray(a, jnp.float32) for a in (out, x0, eps)), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(vb, np.float64), ref.vb_terms_bpd(out, x0, x_t, t), rtol=1e-5)
  # vb_weight scales only the bound term.
  half = diffusion.get_formulation(
    'ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02, learn_sigma=True, vb_weight=0.5
  )
  mse = np.mean((eps - out[..., :3]) ** 2, axis=(1, 2, 3))
  got = half.loss(*(jnp.asarray(a, jnp.float32) for a in (out, x0, eps)), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got, np.float64), mse + 0.5 * (expected - mse), rtol=1e-5)


@pytest.mark.parametrize('name,kind', [('ddpm_v', 'v'), ('ddpm_x0', 'x0')])
def test_hybrid_loss_other_parametrisations(name, kind):
  """The same loss with the mean from a v or x0 prediction (the posterior mean of x0_hat, whatever predicts it)."""
  x0, eps, out, t = loss_inputs(9)
  ref = NumpyLearnedRangeDiffusion(dit_betas())
  noise = out[..., :3] - eps  # the eps prediction's error, reused as this prediction's error
  out = np.concatenate([ref.target(x0, eps, t, kind) + noise, out[..., 3:]], axis=-1)
  form = diffusion.get_formulation(name, schedule='linear', beta_start=1e-4, beta_end=0.02, learn_sigma=True)
  ours = form.loss(*(jnp.asarray(a, jnp.float32) for a in (out, x0, eps)), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref.training_loss(out, x0, eps, t, kind), rtol=1e-5)


def test_gaussian_helpers_match_numpy_reference():
  """KL and the discretised likelihood, including bins many standard deviations out in either tail."""
  rng = np.random.default_rng(10)
  x = rng.integers(0, 256, (4, 64)) / 127.5 - 1.0
  means = x + rng.normal(size=x.shape) * np.logspace(-3, 0, 64)
  log_scales = rng.uniform(-6, -1, x.shape)
  ours = diffusion.discretized_gaussian_log_likelihood(*(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales)))
  expected = np_discretized_gaussian_log_likelihood(x, means, log_scales)
  assert np.min(expected) < -20  # the floored far tails are exercised
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
  m1, m2, lv1, lv2 = rng.normal(size=(4, 4, 8))
  kl = diffusion.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
  np.testing.assert_allclose(kl, np_normal_kl(m1, lv1, m2, lv2), rtol=1e-5, atol=1e-6)


def test_posterior_and_log_variance_match_numpy_reference():
  x0, eps, out, t = loss_inputs(1)
  ref = NumpyLearnedRangeDiffusion(dit_betas())
  form = dit_form()
  x_t = ref.q_sample(x0, t, eps)
  mean, log_var = form.posterior_mean_log_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), t)
  ref_mean, _, ref_log_var = ref.q_posterior_mean_variance(x0, x_t, t)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(log_var, ref_log_var[:, 0, 0, 0], rtol=1e-6)
  _, ref_model_log_var = ref.p_mean_variance(out, x_t, t)
  ours = form.model_log_variance(jnp.asarray(out[..., 3:], jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(ours, ref_model_log_var, rtol=1e-6)
  # The pure posterior function agrees with the tables (t > 0: no clipping).
  ac = form.alphas_cumprod
  pm, pv = diffusion.posterior_mean_variance(x0, x_t, ac[t], np.append(1.0, ac[:-1])[t])
  np.testing.assert_allclose(pm, ref_mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(pv[t > 0], ref.post_var[t][t > 0], rtol=1e-5)


def test_hybrid_loss_gradients_are_split():
  """The MSE trains only the prediction channels, the bound only the variance channels."""
  *arrays, t = loss_inputs(2)
  x0, eps, out = (jnp.asarray(a, jnp.float32) for a in arrays)
  t = jnp.asarray(t)
  form = dit_form()
  plain = diffusion.get_formulation('ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02)
  grad = jax.grad(lambda o: jnp.sum(form.loss(o, x0, eps, t)))(out)
  mse_grad = jax.grad(lambda p: jnp.sum(plain.loss(p, x0, eps, t)))(out[..., :3])
  vb_grad = jax.grad(lambda o: jnp.sum(form.vb_bits_per_dim(o, x0, eps, t)))(out)
  np.testing.assert_allclose(grad[..., :3], mse_grad, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(grad[..., 3:], vb_grad[..., 3:], rtol=1e-6, atol=1e-9)
  # Without the stop-gradient the bound would move the mean: its own gradient there is not zero.
  assert float(jnp.max(jnp.abs(vb_grad[..., :3]))) > 1e-3
  assert float(jnp.min(jnp.max(jnp.abs(grad[..., 3:]), axis=(1, 2, 3)))) > 0


def test_estimates_use_the_prediction_half():
  form = dit_form()
  rng = np.random.default_rng(3)
  x_t = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  out = jnp.asarray(rng.normal(size=SHAPE[:-1] + (6,)), jnp.float32)
  t = jnp.array([10, 700])
  pred, var_values = form.split(out)
  np.testing.assert_array_equal(pred, out[..., :3])
  np.testing.assert_array_equal(var_values, out[..., 3:])
  np.testing.assert_array_equal(form.x0_hat(x_t, out, t), form.x0_hat(x_t, out[..., :3], t))
  np.testing.assert_array_equal(form.eps_hat(x_t, out, t), form.eps_hat(x_t, out[..., :3], t))
  plain = diffusion.get_formulation('ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02)
  np.testing.assert_array_equal(form.x0_hat(x_t, out, t), plain.x0_hat(x_t, out[..., :3], t))
  same, none = plain.split(out)
  assert same is out and none is None
  with pytest.raises(ValueError, match='needs 2C = 6 channels'):
    form.x0_hat(x_t, out[..., :4], t)
  with pytest.raises(ValueError, match='needs 2C = 6 channels'):
    form.loss(out[..., :3], x_t, x_t, t)


def _nchw(x):
  return torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())


def _nhwc(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


def stand_in_jax(x, t, y=None):
  """A fixed nonlinear 2C-channel 'model': an eps prediction (roughly sigma_t x, so that samples stay O(1)), then
  variance values in (-1, 1)."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  return jnp.concatenate([0.9 * x * jnp.tanh(3 * t) + 0.1 * jnp.sin(2 * x + t), jnp.tanh(x - 2 * t + 0.5)], axis=-1)


def stand_in_np(x, t):
  t = float(t) / 1000.0
  return np.concatenate([0.9 * x * np.tanh(3 * t) + 0.1 * np.sin(2 * x + t), np.tanh(x - 2 * t + 0.5)], axis=-1)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def learned_range_scheduler():
  return DDPMScheduler(
    beta_schedule='linear', beta_start=1e-4, beta_end=0.02, variance_type='learned_range', clip_sample=False
  )


@pytest.mark.parametrize('t', [999, 500, 37, 1, 0])
def test_ddpm_step_matches_diffusers_learned_range(t):
  """One step with the noise diffusers draws (replayed from the same torch generator); also its variance alone."""
  sched = learned_range_scheduler()
  rng = np.random.default_rng(4)
  x = rng.normal(size=SHAPE).astype(np.float32)
  out = stand_in_np(x, t).astype(np.float32)
  expected = sched.step(_nchw(out), t, _nchw(x), generator=torch.Generator().manual_seed(7)).prev_sample
  noise = _nhwc(torch.randn(_nchw(x).shape, generator=torch.Generator().manual_seed(7))) if t > 0 else 0 * x
  ours = diffusion.ddpm_step(dit_form(), jnp.asarray(x), jnp.asarray(out), jnp.array(t), jnp.array(t - 1), noise)
  assert ours.shape == SHAPE
  # Both sides are float32 with slightly different alpha_bar roundings (ours from a float64 cumprod): at t = 1,
  # beta_1 = 1 - ac_1 / ac_0 cancels to ~3 digits on both sides (each is ~1e-4 from float64; ~1e-5 from each other).
  np.testing.assert_allclose(ours, _nhwc(expected), rtol=0, atol=2e-5)
  # The log-variance of the step (diffusers' _get_variance for learned_range) against the formulation's.
  if t > 0:
    log_var = sched._get_variance(t, predicted_variance=_nchw(out[..., 3:]))
    ours_log_var = dit_form().model_log_variance(jnp.asarray(out[..., 3:]), jnp.full((2,), t))
    np.testing.assert_allclose(ours_log_var, _nhwc(log_var), rtol=1e-4)


def test_ddpm_trajectory_matches_diffusers_learned_range():
  sched = learned_range_scheduler()
  sched.set_timesteps(20)
  form = dit_form()
  x_init = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
  gen, replay = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
  x, ours = _nchw(x_init), jnp.asarray(x_init)
  for t in sched.timesteps:
    out = _nchw(stand_in_np(_nhwc(x), int(t)).astype(np.float32))
    x = sched.step(out, t, x, generator=gen).prev_sample
    noise = jnp.asarray(_nhwc(torch.randn(x.shape, generator=replay))) if t > 0 else jnp.zeros(SHAPE)
    ours = diffusion.ddpm_step(
      form, ours, stand_in_jax(ours, jnp.full((2,), int(t))), jnp.array(int(t)), jnp.array(int(t) - 50), noise
    )
  assert ours.shape == SHAPE
  assert rel(ours, _nhwc(x)) <= 1e-5


def numpy_ddpm_loop(form, x_init, keys, num_steps):
  """Ancestral sampling with the learned variance in float64, on the leading grid, with the sampler's noise draws."""
  ac = np.asarray(form.alphas_cumprod, np.float64)
  stride = T // num_steps
  x = np.asarray(x_init, np.float64)
  c = x.shape[-1]
  for i, t in enumerate(range((num_steps - 1) * stride, -1, -stride)):
    out = stand_in_np(x, t)
    a_t, a_prev = ac[t], (ac[t - stride] if t - stride >= 0 else 1.0)
    beta = 1 - a_t / a_prev
    x0 = (x - np.sqrt(1 - a_t) * out[..., :c]) / np.sqrt(a_t)
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    frac = (out[..., c:] + 1) / 2
    log_var = frac * np.log(beta) + (1 - frac) * np.log(max((1 - a_prev) / (1 - a_t) * beta, 1e-20))
    noise = np.asarray(jax.random.normal(keys[i], x.shape, jnp.float32), np.float64)
    x = mean + (t > 0) * np.exp(0.5 * log_var) * noise
  return x


def test_sample_ddpm_learned_sigma_matches_numpy_loop():
  form = dit_form()
  x_init = np.random.default_rng(6).normal(size=SHAPE).astype(np.float32)
  key = jax.random.key(3)
  out = jax.jit(lambda x: diffusion.sample(stand_in_jax, form, x, key, sampler='ddpm', num_steps=10))(x_init)
  assert out.shape == SHAPE
  expected = numpy_ddpm_loop(form, x_init, jax.random.split(key, 10), 10)
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5 * np.max(np.abs(expected)))
  # The learned variance is used: fixed-small sampling with the prediction half differs.
  plain = diffusion.get_formulation('ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02)
  fixed = diffusion.sample(
    lambda x, t, y: stand_in_jax(x, t)[..., :3], plain, jnp.asarray(x_init), key, sampler='ddpm', num_steps=10
  )
  assert float(jnp.max(jnp.abs(fixed - out))) > 1e-3


@pytest.mark.parametrize('eta', [0.0, 0.5])
def test_ddim_ignores_the_variance_channels(eta):
  form = dit_form()
  plain = diffusion.get_formulation('ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02)
  x_init = jnp.asarray(np.random.default_rng(7).normal(size=SHAPE), jnp.float32)
  key = jax.random.key(4)
  out = diffusion.sample(stand_in_jax, form, x_init, key, sampler='ddim', eta=eta, num_steps=8)
  first_half = diffusion.sample(
    lambda x, t, y: stand_in_jax(x, t)[..., :3], plain, x_init, key, sampler='ddim', eta=eta, num_steps=8
  )
  assert out.shape == SHAPE
  np.testing.assert_array_equal(out, first_half)


def test_guidance_guides_only_the_prediction_half():
  def model(x, t, y):
    label = y.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.concatenate([x * 0 + label, x * 0 - 2 * label], axis=-1)

  x, t, y = jnp.ones((2, 3)), jnp.zeros(2), jnp.array([2, 5])
  guided = diffusion.classifier_free_guidance(model, 1.5, 10, learn_sigma=True)(x, t, y)
  assert guided.shape == (2, 6)
  np.testing.assert_allclose(guided[:, :3], np.array([[10 + 1.5 * (2 - 10)] * 3, [10 + 1.5 * (5 - 10)] * 3]))
  np.testing.assert_allclose(guided[:, 3:], np.array([[-4.0] * 3, [-10.0] * 3]))  # the conditional variance half
  # In the sampler, the formulation's learn_sigma selects it: DDIM with guidance equals guiding the first half only.
  form = dit_form()
  plain = diffusion.get_formulation('ddpm_eps', schedule='linear', beta_start=1e-4, beta_end=0.02)
  x_init = jnp.asarray(np.random.default_rng(8).normal(size=SHAPE), jnp.float32)
  labels = jnp.array([1, 3])

  def labelled(x, t, y):
    return stand_in_jax(x, t) * (1 + 0.1 * y.astype(jnp.float32).reshape((-1, 1, 1, 1)))

  kw = dict(sampler='ddim', num_steps=5, y=labels, guidance_scale=3.0, null_class=0)
  out = diffusion.sample(labelled, form, x_init, jax.random.key(0), **kw)
  ref = diffusion.sample(lambda x, t, y: labelled(x, t, y)[..., :3], plain, x_init, jax.random.key(0), **kw)
  assert out.shape == SHAPE
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_learn_sigma_errors():
  with pytest.raises(ValueError, match='learn_sigma .* needs a DDPM formulation, not flow_ot'):
    diffusion.get_formulation('flow_ot', learn_sigma=True)
  with pytest.raises(ValueError, match='learn_sigma'):
    diffusion.Formulation('flow_ot', learn_sigma=True)
  form = dit_form()
  x = jnp.ones(SHAPE)
  with pytest.raises(ValueError, match='needs 2C = 6 channels'):
    diffusion.ddpm_step(form, x, x, jnp.array(5), jnp.array(4), x)
  with pytest.raises(ValueError, match='even channel count'):
    form.split(jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="vb_bits_per_dim needs a learn_sigma formulation; 'ddpm_eps'"):
    diffusion.get_formulation('ddpm_eps').vb_bits_per_dim(x, x, x, jnp.array([1, 2]))
