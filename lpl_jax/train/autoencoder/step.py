"""The autoencoder's train state and its pure, jitted step (LDM's `LPIPSWithDiscriminator` recipe).

One step, for images `x`:
  mean, logvar = encode(x); z = mean + exp(logvar / 2) * eps; x_rec = decode(z)
  nll = rec(x, x_rec) + perceptual_weight * H*W*C * ssim_loss(x, x_rec)           (summed per example, LDM)
  loss = mean(nll) + kl_weight * mean(KL) + gan * lambda * mean(-D(x_rec))
  lambda = adaptive weight from the gradients of mean(nll) and of the generator loss w.r.t. decoder.conv_out
  discriminator (when `gan`): hinge loss on D(x) and D(stop_gradient(x_rec)), its own AdamW.
The GAN branch is a static flag, so the step compiles once without and once with it (from `disc_start`).
Differences from LDM: the output log-variance that LDM learns (initialised 0) is fixed at 0; the discriminator sees
the reconstructions of the same forward pass rather than a second forward after the autoencoder's update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lpl_jax.autoencoder import AutoencoderKL, init_params, kl_divergence, sample_posterior
from lpl_jax.train.autoencoder import losses
from lpl_jax.train.autoencoder.config import AETrainConfig
from lpl_jax.train.autoencoder.discriminator import PatchDiscriminator


@dataclasses.dataclass(frozen=True)
class LossConfig:
  rec_loss: str
  kl_weight: float
  perceptual_weight: float
  disc_weight: float


@flax.struct.dataclass
class AEState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any  # None without a discriminator
  disc_opt_state: Any
  rng: jax.Array


def loss_config(cfg: AETrainConfig) -> LossConfig:
  return LossConfig(cfg.rec_loss, cfg.kl_weight, cfg.perceptual_weight, cfg.disc_weight)


def make_optimizer(cfg: AETrainConfig) -> optax.GradientTransformation:
  lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)


def make_models(cfg: AETrainConfig) -> tuple[AutoencoderKL, PatchDiscriminator | None]:
  dtype = jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32
  model = AutoencoderKL(cfg.autoencoder_config(), dtype=dtype)
  disc = PatchDiscriminator(cfg.disc_width, cfg.disc_layers, dtype=dtype) if cfg.disc_weight else None
  return model, disc


def create_state(
  cfg: AETrainConfig, model: AutoencoderKL, disc: PatchDiscriminator | None, optimizer: optax.GradientTransformation
) -> AEState:
  k_ae, k_disc, k_run = jax.random.split(jax.random.key(cfg.seed), 3)
  # Jitted: eager initialisation dispatches every op on its own and takes tens of seconds on a CPU.
  params = jax.jit(init_params, static_argnums=(0, 2))(model, k_ae, cfg.resolution)
  disc_params = disc_opt = None
  if disc is not None:
    x = jnp.zeros((1, cfg.resolution, cfg.resolution, 3), jnp.float32)
    disc_params = jax.jit(disc.init)(k_disc, x)['params']
    disc_opt = optimizer.init(disc_params)
  return AEState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    disc_params=disc_params,
    disc_opt_state=disc_opt,
    rng=k_run,
  )


def _decoder_head_input(module: AutoencoderKL, z: jax.Array) -> jax.Array:
  """The activation that `decoder.conv_out` maps to the image: `silu(norm(last up block))`."""
  h = module.decoder_features(z)[-1]
  return nn.silu(module.decoder.conv_norm_out(h))


def _conv_out(module: AutoencoderKL, h: jax.Array) -> jax.Array:
  return module.decoder.conv_out(h).astype(jnp.float32)


def reconstruct(
  model: AutoencoderKL, params: Any, x: jax.Array, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(x_rec, h, mean, logvar)`; `z` is the posterior mean when `key` is None, else a posterior sample.

  `x_rec` is `decode(z)` computed as `conv_out(h)`, so that the step can differentiate through the last layer alone.
  """
  if model.config.asymmetric:
    raise ValueError('the autoencoder trainer handles AutoencoderKL, not AsymmetricAutoencoderKL.')
  mean, logvar = model.apply({'params': params}, x, method=model.encode)
  z = mean if key is None else sample_posterior(key, mean, logvar)
  h = model.apply({'params': params}, z.astype(model.dtype), method=_decoder_head_input)
  return model.apply({'params': params}, h, method=_conv_out), h, mean, logvar


def _with_last_kernel(params: Any, kernel: jax.Array) -> Any:
  decoder = dict(params['decoder'])
  decoder['conv_out'] = dict(decoder['conv_out'], kernel=kernel)
  return dict(params, decoder=decoder)


def _nll(x: jax.Array, x_rec: jax.Array, cfg: LossConfig) -> tuple[jax.Array, dict]:
  """Per-example reconstruction (+ structure) loss `[B]` and its parts."""
  l1, l2 = losses.l1_reconstruction(x, x_rec), losses.l2_reconstruction(x, x_rec)
  nll = {'l1': l1, 'l2': l2, 'l1+l2': l1 + l2}[cfg.rec_loss]
  parts = {'l1': jnp.mean(l1) / x[0].size, 'mse': jnp.mean(l2) / x[0].size}
  if cfg.perceptual_weight:
    structure = losses.ssim_loss(x, x_rec)
    nll = nll + cfg.perceptual_weight * x[0].size * structure
    parts['ssim_loss'] = jnp.mean(structure)
  return nll, parts


def last_layer_grads(
  model: AutoencoderKL,
  params: Any,
  h: jax.Array,
  x: jax.Array,
  disc: PatchDiscriminator,
  disc_params: Any,
  cfg: LossConfig,
) -> tuple[jax.Array, jax.Array]:
  """Gradients of `mean(nll)` and of the generator loss w.r.t. the `decoder.conv_out` kernel (taming's
  `last_layer`), for the adaptive weight.

  `h` (the input of `conv_out`, from `reconstruct`) is held constant: these gradients depend on the kernel only
  through the last convolution, so they cost that convolution and the discriminator, not another decoder backward.
  """
  h = jax.lax.stop_gradient(h)
  rec_of = lambda k: model.apply({'params': _with_last_kernel(params, k)}, h, method=_conv_out)
  kernel = params['decoder']['conv_out']['kernel']
  nll_grad = jax.grad(lambda k: jnp.mean(_nll(x, rec_of(k), cfg)[0]))(kernel)
  gan_grad = jax.grad(lambda k: jnp.mean(losses.generator_loss(disc.apply({'params': disc_params}, rec_of(k)))))(kernel)
  return nll_grad, gan_grad


def train_step(
  state: AEState,
  batch: dict,
  *,
  model: AutoencoderKL,
  disc: PatchDiscriminator | None,
  optimizer: optax.GradientTransformation,
  cfg: LossConfig,
  gan: bool,
) -> tuple[AEState, dict]:
  """One update of the autoencoder (and, when `gan`, of the discriminator) on `batch['images'] [B, H, W, 3]`."""
  x = batch['images'].astype(jnp.float32)
  rng, key = jax.random.split(state.rng)

  def ae_loss(params):
    x_rec, h, mean, logvar = reconstruct(model, params, x, key)
    nll, metrics = _nll(x, x_rec, cfg)
    kl = kl_divergence(mean, logvar)
    loss = jnp.mean(nll) + cfg.kl_weight * jnp.mean(kl)
    metrics.update(nll=jnp.mean(nll), kl=jnp.mean(kl))
    if gan:
      g_loss = jnp.mean(losses.generator_loss(disc.apply({'params': state.disc_params}, x_rec)))
      nll_grad, gan_grad = last_layer_grads(model, params, h, x, disc, state.disc_params, cfg)
      d_weight = losses.adaptive_weight(nll_grad, gan_grad, disc_weight=cfg.disc_weight)
      loss = loss + d_weight * g_loss
      metrics.update(g_loss=g_loss, d_weight=d_weight)
    metrics['loss'] = loss
    return loss, (metrics, x_rec)

  (_, (metrics, x_rec)), grads = jax.value_and_grad(ae_loss, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  state = state.replace(
    step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state, rng=rng
  )
  metrics['psnr'] = jnp.mean(psnr(x, x_rec))
  if gan:
    fake = jax.lax.stop_gradient(x_rec)

    def d_loss_fn(disc_params):
      real_logits = disc.apply({'params': disc_params}, x)
      fake_logits = disc.apply({'params': disc_params}, fake)
      return jnp.mean(losses.hinge_discriminator_loss(real_logits, fake_logits)), (real_logits, fake_logits)

    (d_loss, (real_logits, fake_logits)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
    d_updates, d_opt = optimizer.update(d_grads, state.disc_opt_state, state.disc_params)
    state = state.replace(disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt)
    metrics.update(d_loss=d_loss, logits_real=jnp.mean(real_logits), logits_fake=jnp.mean(fake_logits))
  return state, metrics


def psnr(x: jax.Array, x_rec: jax.Array, data_range: float = 2.0) -> jax.Array:
  """PSNR in dB of `x_rec` clipped to [-1, 1] against `x`, per example `[B]`."""
  mse = jnp.mean(jnp.square(jnp.clip(x_rec, -1.0, 1.0) - x), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def jit_train_step(
  cfg: AETrainConfig,
  model: AutoencoderKL,
  disc: PatchDiscriminator | None,
  optimizer: optax.GradientTransformation,
  *,
  gan: bool,
):
  """The step with its static parts bound, jitted with the state donated."""
  fn = functools.partial(train_step, model=model, disc=disc, optimizer=optimizer, cfg=loss_config(cfg), gan=gan)
  return jax.jit(fn, donate_argnums=0)
