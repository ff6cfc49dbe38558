"""A tiny end-to-end training setup shared by the train tests and the sharded-run script."""

import jax
import jax.numpy as jnp

from lpl_jax import autoencoder as ae
from lpl_jax import diffusion, lpl, train
from lpl_jax.models.dit import DiT
from tests.tiny_autoencoder import tiny_autoencoder

BATCH, SIDE, CLASSES = 16, 4, 10


def setup(
  *, weight=3.0, start_step=0, lpl_on=True, chunk=0, groups=0, lr=1e-3, accum=1, dtype=jnp.float32, remat=False
):
  model = DiT(
    patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=CLASSES, in_channels=4, dtype=dtype, remat=remat
  )
  ae_model = ae.from_preset('tiny', dtype=dtype)
  ae_params = _ae_params(dtype)
  form = diffusion.get_formulation('ddpm_eps')
  sampler = diffusion.TimestepSampler(num_timesteps=1000)
  lcfg = lpl.LPLConfig.from_preset('paper', weight=weight, tau=20.0) if lpl_on else None
  group = BATCH // (groups or 1)
  k = sampler.split(form, lpl.noise_level_threshold(lcfg, SIDE * 8), group) if lpl_on else 0
  optim = train.OptimConfig(lr=lr, ema_decay=0.9)
  cfg = train.StepConfig(
    form,
    sampler,
    optim,
    lpl=lcfg,
    lpl_rows_per_group=k,
    lpl_groups=groups,
    lpl_start_step=start_step,
    lpl_chunk=chunk,
    null_class=CLASSES,
    accum_steps=accum,
  )
  return model, ae_model, ae_params, cfg


def _ae_params(dtype):
  return tiny_autoencoder(seed=9, dtype=dtype)[1]


def init_params_fn(model):
  x, t, y = jnp.zeros((1, SIDE, SIDE, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32)
  return lambda key: model.init(key, x, t, y)['params']


def batch(seed=1):
  return {
    'latents': jax.random.normal(jax.random.key(seed), (BATCH, SIDE, SIDE, 4)),
    'labels': jnp.arange(BATCH, dtype=jnp.int32) % CLASSES,
  }
