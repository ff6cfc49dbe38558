"""Timestep weightings of the diffusion loss: Min-SNR-gamma against diffusers' training utilities and against its
definition in x0 space, and the paper's Eq. 15 in the train step against a NumPy computation of the same batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import diffusion, lpl, train
from lpl_jax.models.dit import DiT
from lpl_jax.train import step as step_lib
from tests.train import common

GAMMA = 5.0


@pytest.mark.parametrize('name', ['ddpm_eps', 'ddpm_v'])
def test_min_snr_matches_diffusers(name):
  """diffusers' text-to-image example's Min-SNR weights: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
  import torch
  from diffusers import DDPMScheduler
  from diffusers.training_utils import compute_snr

  scheduler = DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
  t = np.arange(0, 1000, 7)
  snr = compute_snr(scheduler, torch.tensor(t)).double()
  ref = torch.clamp(snr, max=GAMMA) / (snr if name == 'ddpm_eps' else snr + 1)
  ours = diffusion.get_formulation(name).min_snr_weight(jnp.asarray(t), GAMMA)
  np.testing.assert_allclose(ours, ref.numpy(), rtol=2e-5)


@pytest.mark.parametrize('name', ['ddpm_eps', 'ddpm_v', 'ddpm_x0', 'flow_ot'])
def test_min_snr_is_min_snr_gamma_times_the_x0_error(name):
  """Definition (Hang et al. 2023, Eq. 8): weight * |output error|^2 = min(SNR_t, gamma) * |x0_hat error|^2 for any
  output error, with SNR_t = alpha_t^2 / sigma_t^2 and x0_hat the formulation's own estimate."""
  form = diffusion.get_formulation(name)
  t = jnp.linspace(0.01, 0.99, 9) if form.is_flow else jnp.arange(5, 1000, 111)
  keys = jax.random.split(jax.random.key(0), 3)
  x_t, pred, err = (jax.random.normal(k, (t.shape[0], 2, 2, 3)) for k in keys)
  dx0 = form.x0_hat(x_t, pred + err, t) - form.x0_hat(x_t, pred, t)
  alpha, sigma = form.alpha_sigma(t)
  snr = np.asarray(alpha, np.float64) ** 2 / np.asarray(sigma, np.float64) ** 2
  lhs = np.asarray(form.min_snr_weight(t, GAMMA)) * np.sum(np.asarray(err) ** 2, axis=(1, 2, 3))
  rhs = np.minimum(snr, GAMMA) * np.sum(np.asarray(dx0, np.float64) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_lpl_variance_needs_lpl():
  with pytest.raises(ValueError, match='needs LPL on'):
    train.StepConfig(None, None, train.OptimConfig(), loss_weighting='lpl_variance')
  with pytest.raises(ValueError, match="loss_weighting='snr'"):
    train.StepConfig(None, None, train.OptimConfig(), loss_weighting='snr')


def test_loss_stats_running_average():
  stats = train.initial_loss_stats()
  on = jnp.asarray(True)
  first = train.update_loss_stats(stats, {'diffusion_var': 2.0, 'lpl_var': 1.0}, 0.9, on)
  assert float(first['diffusion_var']) == 2.0 and float(train.variance_ratio(first)) == 0.5
  second = train.update_loss_stats(first, {'diffusion_var': 4.0, 'lpl_var': 3.0}, 0.9, on)
  assert float(second['diffusion_var']) == pytest.approx(0.9 * 2 + 0.1 * 4)
  assert float(second['lpl_var']) == pytest.approx(0.9 * 1 + 0.1 * 3)
  same = train.update_loss_stats(second, {'diffusion_var': 9.0, 'lpl_var': 9.0}, 0.9, jnp.asarray(False))
  assert jax.tree.map(float, same) == jax.tree.map(float, second)
  assert float(train.variance_ratio(train.initial_loss_stats())) == 0.0


@pytest.mark.slow
def test_eq15_step_matches_numpy():
  """One step with `loss_weighting='lpl_variance'` from a state whose running variances give the ratio 0.5: the loss
  is the diffusion loss with the K gated rows weighted 1 + w_lpl * 0.5 (no LPL term), and the running variances move
  towards the batch's variances of the per-row diffusion and LPL losses, recomputed here from the same draws."""
  model, ae_model, ae_params, cfg = common.setup(weight=3.0)
  decay = 0.9
  cfg = dataclasses.replace(cfg, loss_weighting='lpl_variance', stats_decay=decay)
  optimizer = train.make_optimizer(cfg.optim)
  state = train.create_state(common.init_params_fn(model)(jax.random.key(0)), optimizer, jax.random.key(1))
  state = state.replace(loss_stats={'diffusion_var': jnp.float32(2.0), 'lpl_var': jnp.float32(1.0)})
  batch = common.batch()
  step = jax.jit(
    lambda s, b, p: train.train_step(s, b, p, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model)
  )
  new, metrics = step(state, batch, ae_params)

  # The same draws as the step, then the losses per row, in NumPy from here on.
  _, *keys = jax.random.split(state.rng, 4)
  rows = step_lib.noise_batch(tuple(keys), batch, cfg, 1)
  form = cfg.formulation
  pred = model.apply({'params': state.params}, rows.z_t, form.model_time(rows.t), rows.cond['y'])
  per_row = np.asarray(form.loss(pred, rows.z0, rows.eps, rows.t), np.float64)
  k = cfg.lpl_rows_per_group
  z0_hat = form.x0_hat(rows.z_t, pred, rows.t)
  lpl_rows, _ = lpl.lpl_loss(lpl.make_features_fn(ae_model, ae_params, cfg.lpl), z0_hat[:k], rows.z0[:k], cfg.lpl)
  lpl_rows = np.asarray(lpl_rows, np.float64)
  assert 0 < k < common.BATCH and np.all(lpl_rows > 0)

  weights = np.ones(common.BATCH)
  weights[:k] = 1 + 3.0 * 0.5
  assert float(metrics['loss/total']) == pytest.approx(np.mean(weights * per_row), rel=1e-5)
  assert float(metrics['loss/diffusion']) == pytest.approx(np.mean(per_row), rel=1e-5)
  assert float(metrics['loss/lpl']) == pytest.approx(np.mean(lpl_rows), rel=1e-4)
  expected = {'diffusion_var': 0.9 * 2.0 + 0.1 * np.var(per_row), 'lpl_var': 0.9 * 1.0 + 0.1 * np.var(lpl_rows)}
  for key, value in expected.items():
    assert float(new.loss_stats[key]) == pytest.approx(value, rel=1e-4), key
  assert float(metrics['lpl/variance_ratio']) == pytest.approx(expected['lpl_var'] / expected['diffusion_var'], 1e-4)

  # The gradient is that of the weighted diffusion loss alone: the same update as a step without LPL whose loss
  # weights are those weights.
  def weighted(params):
    p = model.apply({'params': params}, rows.z_t, form.model_time(rows.t), rows.cond['y'])
    return jnp.mean(jnp.asarray(weights, jnp.float32) * form.loss(p, rows.z0, rows.eps, rows.t))

  grads = jax.grad(weighted)(state.params)
  assert float(metrics['grad_norm']) == pytest.approx(
    float(jax.numpy.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))), rel=1e-4
  )


@pytest.mark.slow
def test_min_snr_step_weights_the_rows():
  """A step with `loss_weighting='min_snr'` and no LPL: the loss is the min-SNR weighted mean of the per-row losses."""
  model, _, _, cfg = common.setup(lpl_on=False)
  cfg = dataclasses.replace(cfg, loss_weighting='min_snr', min_snr_gamma=GAMMA)
  optimizer = train.make_optimizer(cfg.optim)
  state = train.create_state(common.init_params_fn(model)(jax.random.key(0)), optimizer, jax.random.key(1))
  batch = common.batch()
  _, metrics = jax.jit(lambda s, b: train.train_step(s, b, None, model=model, optimizer=optimizer, cfg=cfg))(
    state, batch
  )
  _, *keys = jax.random.split(state.rng, 4)
  rows = step_lib.noise_batch(tuple(keys), batch, cfg, 1)
  form = cfg.formulation
  pred = model.apply({'params': state.params}, rows.z_t, form.model_time(rows.t), rows.cond['y'])
  per_row = np.asarray(form.loss(pred, rows.z0, rows.eps, rows.t), np.float64)
  alpha, sigma = (np.asarray(v, np.float64) for v in form.alpha_sigma(rows.t))
  snr = alpha**2 / sigma**2
  assert float(metrics['loss/total']) == pytest.approx(np.mean(np.minimum(snr, GAMMA) / snr * per_row), rel=1e-5)


def test_min_snr_weights_the_mse_and_not_the_variational_bound():
  """With a learned variance the step's loss is mean(w * mse + vb): the weighting leaves the bound's term alone, as
  Min-SNR's guided-diffusion code does; computed here from the two terms in NumPy."""
  model = DiT(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=common.CLASSES, learn_sigma=True)
  form = diffusion.get_formulation('ddpm_eps', learn_sigma=True)
  _, _, _, cfg = common.setup(lpl_on=False)
  cfg = dataclasses.replace(cfg, formulation=form, loss_weighting='min_snr', min_snr_gamma=GAMMA)
  params = common.init_params_fn(model)(jax.random.key(0))
  rows = step_lib.noise_batch(tuple(jax.random.split(jax.random.key(2), 3)), common.batch(), cfg, 1)
  total, metrics = step_lib.loss_fn(
    params,
    rows,
    None,
    jnp.asarray(False),
    jnp.zeros(()),
    model=model,
    cfg=cfg,
    ae_model=None,
    mesh=None,
    groups=1,
    batch_size=common.BATCH,
    accum=1,
  )
  pred = np.asarray(model.apply({'params': params}, rows.z_t, form.model_time(rows.t), rows.cond['y']), np.float64)
  eps_hat, v = pred[..., :4], pred[..., 4:]
  mse = np.mean((eps_hat - np.asarray(rows.eps, np.float64)) ** 2, axis=(1, 2, 3))
  vb = np.asarray(form.vb_bits_per_dim(jnp.asarray(pred, jnp.float32), rows.z0, rows.eps, rows.t), np.float64)
  alpha, sigma = (np.asarray(a, np.float64) for a in form.alpha_sigma(rows.t))
  w = np.minimum(alpha**2 / sigma**2, GAMMA) / (alpha**2 / sigma**2)
  assert np.all(vb > 0) and np.ptp(w) > 0.1 and v.shape == eps_hat.shape
  assert float(total) == pytest.approx(np.mean(w * mse + vb), rel=1e-5)
  assert abs(float(total) - np.mean(w * (mse + vb))) > 1e-3 * np.mean(vb)
  assert float(metrics['loss/diffusion']) == pytest.approx(np.mean(mse + vb), rel=1e-5)
  weighted = form.loss(jnp.asarray(pred, jnp.float32), rows.z0, rows.eps, rows.t, jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(np.asarray(weighted), w * mse + vb, rtol=1e-5)
