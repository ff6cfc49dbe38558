"""The `reference` preset through the train step, against the public reference's training loop (diffusers' research
project `train_sdxl_lpl.py`) computed independently on the same batch: its gate (`timesteps < 200`) picks the rows,
z0_hat comes from diffusers' `alphas_cumprod`, the per-sample loss is tests/lpl/torch_lpl.py's on diffusers' decoder,
averaged over the gated rows, weighted 1.0 and added to the MSE of the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lpl_jax.train import build, step
from lpl_jax.train.config import step_config
from tests.lpl import torch_lpl
from tests.run import common

# Compiles the denoiser and the decoder's forward and backward (~1 min on a CPU): left to CI.
pytestmark = pytest.mark.slow

BATCH = 10  # 20% of 10 rows: the gate's K = 2 is exact, so rows [:2] are t < 200 and rows [2:] t >= 200


def test_the_reference_preset_step_equals_the_reference_training_loop(diffusers_folder):
  folder, vae = diffusers_folder('tiny')
  overrides = {
    'lpl.preset': 'reference',
    'lpl.groups': 1,
    'lpl.remat': False,
    'data.global_batch': BATCH,
    'autoencoder.weights': folder,
  }
  exp = common.experiment('demo_cpu.py', 'post,lpl', **overrides)
  cfg = step_config(exp, num_devices=1)
  assert (cfg.lpl.gate, cfg.lpl.t_threshold, cfg.lpl.weight, cfg.lpl_normalize) == ('timestep', 200, 1.0, 'rows')
  assert cfg.lpl_rows_per_group == 2  # floor(P(t < 200) x 10), P = 0.2 for uniform t

  ae_model, ae_params = build.load_autoencoder(exp)
  model = build.make_denoiser(exp, ae_model.config.latent_channels)
  params = build.init_params_fn(exp, model)(jax.random.key(0))
  z0 = 0.8 * jax.random.normal(jax.random.key(1), (BATCH, 4, 4, 4))
  batch = {'latents': z0, 'labels': jnp.arange(BATCH, dtype=jnp.int32) % 8}
  rows = step.noise_batch(tuple(jax.random.split(jax.random.key(2), 3)), batch, cfg, groups=1)
  total, metrics = jax.jit(
    lambda p: step.loss_fn(
      p,
      rows,
      ae_params,
      jnp.asarray(True),
      jnp.asarray(0.0),  # Eq. 15's variance ratio: unused under loss_weighting='none'
      model=model,
      cfg=cfg,
      ae_model=ae_model,
      mesh=None,
      groups=1,
      batch_size=BATCH,
      accum=1,
    )
  )(params)

  # The reference loop, on the same draws: its own gate, z0_hat from diffusers' schedule, the mean over the gated rows.
  t = np.asarray(rows.t)
  gated = t < 200
  assert gated.sum() == 2 and gated[:2].all(), t
  cond = dict(rows.cond)
  pred = np.asarray(model.apply({'params': params}, rows.z_t, rows.t, cond.pop('y')), np.float64)
  sched = DDPMScheduler(beta_schedule=exp.diffusion.schedule, beta_start=exp.diffusion.beta_start, beta_end=0.012)
  acp = sched.alphas_cumprod.numpy().astype(np.float64)[t[gated]].reshape(-1, 1, 1, 1)
  z0_hat = (np.asarray(rows.z_t, np.float64)[gated] - np.sqrt(1 - acp) * pred[gated]) / np.sqrt(acp)

  def nchw(x):
    return torch.from_numpy(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)).copy())

  with torch.no_grad():
    lpl = float(torch_lpl.reference_lpl(vae, nchw(z0_hat), nchw(np.asarray(z0)[gated])).mean())
  mse = float(np.mean((pred - np.asarray(rows.eps, np.float64)) ** 2))
  assert exp.diffusion.beta_end == 0.012
  assert float(metrics['loss/diffusion']) == pytest.approx(mse, rel=1e-5)
  assert float(metrics['loss/lpl']) == pytest.approx(lpl, rel=2e-4)
  # The LPL part of the total on its own (it is small beside the MSE): weight 1 x the mean over the 2 gated rows
  # (the paper's averaging would give 2/10 of it, the paper's weight 3x).
  assert float(total) - float(metrics['loss/diffusion']) == pytest.approx(1.0 * lpl, rel=2e-3)
