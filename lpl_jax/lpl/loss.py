"""The latent perceptual loss: decoder features of `z0` and `z0_hat`, masked, normalised, weighted, per sample.

```
target = stop_gradient(features(z0))       pred = features(z0_hat)      (only as deep as the deepest used tap)
per used tap l:  mask_l  = outlier_mask(pred_l or target_l)             (on outlier_layers, Algorithm 1)
                 p, t    = normalise(pred_l, target_l [* mask_l])
                 d_l     = masked_distance(p, t, mask_l)                [B]
loss = reduce_l(omega_l * d_l)                                          [B]
```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax.autoencoder import AutoencoderKL
from lpl_jax.lpl import terms
from lpl_jax.lpl.config import LPLConfig
from lpl_jax.lpl.outliers import outlier_mask
from lpl_jax.models.layers import remat_policy


@dataclasses.dataclass(frozen=True)
class FeaturesFn:
  """Decoder features of latents in diffusion (scaled) space, bound to frozen autoencoder params.

  `fn(z_scaled, num_blocks) -> [mid, up_0, ..., up_{num_blocks-1}]`; `fn.decode(z_scaled) -> RGB`. The latents are
  unscaled with the model's `scaling_factor`/`shift_factor`; the params are under `stop_gradient`, so no gradient
  is ever computed for them.
  """

  model: AutoencoderKL
  params: Any
  apply_post_quant_conv: bool = True

  @property
  def downsample_factor(self) -> int:
    return self.model.config.downsample_factor

  def __call__(self, z_scaled: jax.Array, num_blocks: int) -> list[jax.Array]:
    params = jax.lax.stop_gradient(self.params)
    z = self.model.unscale_latents(z_scaled)
    return self.model.apply(
      {'params': params}, z, num_blocks, self.apply_post_quant_conv, method=AutoencoderKL.decoder_features
    )

  def decode(self, z_scaled: jax.Array) -> jax.Array:
    params = jax.lax.stop_gradient(self.params)
    return self.model.apply({'params': params}, self.model.unscale_latents(z_scaled), method=AutoencoderKL.decode)


def make_features_fn(model: AutoencoderKL, params: Any, cfg: LPLConfig) -> FeaturesFn:
  """Binds the autoencoder (rematerialised per block if `cfg.remat`, keeping what `cfg.remat_policy` names) to its
  frozen params for `lpl_loss`.

  Call it inside the jitted step with the autoencoder params passed to the step as an argument.
  """
  if cfg.num_blocks > model.config.num_up_blocks:
    raise ValueError(
      f'decoder has {model.config.num_up_blocks} up blocks, LPLConfig.num_blocks asks for {cfg.num_blocks}.'
    )
  model = model.clone(remat=cfg.remat, remat_policy=remat_policy(cfg.remat_policy) if cfg.remat else None)
  return FeaturesFn(model, params, cfg.apply_post_quant_conv)


def kernel_scale(cfg: LPLConfig, image_size: int) -> float:
  """Growth of the morphology kernels at `image_size`: resolution / base above the base resolution, else 1.

  The paper grows them to cover the same proportion of the image at 512 px; shrinking them below the base would
  turn the smoothing off (kernels of 1), so smaller images keep Algorithm 1's sizes.
  """
  return max(1.0, image_size / cfg.base_resolution) if cfg.scale_with_resolution else 1.0


def layer_down_factors(shapes: list[tuple[int, ...]], image_size: int) -> list[float]:
  """Output image resolution / tap resolution (e.g. 8, 4, 2, 1, 1 for an SD decoder)."""
  return [image_size / s[1] for s in shapes]


def layer_masks(features: Sequence[jax.Array], cfg: LPLConfig, image_size: int) -> list[jax.Array | None]:
  """Algorithm 1's keep-masks of the used taps: `features[j]` is tap `cfg.used_layers[j]`, `[B, H, W, C]`, of the
  tensor the masks come from (`cfg.mask_source`); the mask is `[B, H, W, C]` bool (True = keep), or None for a tap
  that gets none. The kernels are scaled by each tap's down factor and, above the base resolution, by the image
  size (`kernel_scale`). `lpl_loss` masks with this, so do figures of the masks."""
  if len(features) != len(cfg.used_layers):
    raise ValueError(f'{len(features)} feature maps for the {len(cfg.used_layers)} used taps {cfg.used_layers}.')
  scale = kernel_scale(cfg, image_size)
  downs = layer_down_factors([tuple(f.shape) for f in features], image_size)
  masks = []
  for i, f, down in zip(cfg.used_layers, features, downs, strict=True):
    if cfg.outlier_removal and i in cfg.outlier_layers:
      masks.append(
        outlier_mask(
          _at_least_f32(f),
          quant=cfg.quant,
          down_factor=down,
          opening=cfg.opening,
          closing=cfg.closing,
          kernel_scale=scale,
          margin_std=cfg.margin_std,
          approx=cfg.approx_top_k,
          recall_target=cfg.approx_recall,
        )
      )
    else:
      masks.append(None)
  return masks


def lpl_loss(
  features_fn: Callable[[jax.Array, int], list[jax.Array]],
  z0_hat: jax.Array,
  z0: jax.Array,
  cfg: LPLConfig,
  *,
  sample_weights: jax.Array | None = None,
  downsample_factor: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Latent perceptual loss per sample.

  Args:
    features_fn: `(z_scaled, num_blocks) -> [mid, up_0, ...]`, e.g. from `make_features_fn`. For
      `cfg.space == 'image'` it must also have `.decode(z_scaled)`.
    z0_hat: `[B, h, w, c]` the model's estimate of the clean latent, in diffusion (scaled) space.
    z0: `[B, h, w, c]` the clean latent (no gradient flows into it).
    cfg: the loss configuration.
    sample_weights: optional `[B]` multipliers (e.g. a noise-level gate from `gate_weights`).
    downsample_factor: image pixels per latent pixel; taken from `features_fn.downsample_factor` if omitted.

  Returns:
    `(loss [B], aux)`; aux holds `layer_loss [B, L]` (the unweighted per-tap distances of the used taps),
    `outlier_fraction [B, L]` (fraction of positions masked, 0 where no mask), `std_ratio [B, L]` (the prediction's
    feature std over the target's, mean over channels, before normalisation: `terms.std_ratio`) and
    `layer_weights [L]`.
  """
  chex.assert_rank([z0_hat, z0], 4)
  chex.assert_equal_shape([z0_hat, z0])
  factor = downsample_factor or getattr(features_fn, 'downsample_factor', None)
  if factor is None:
    raise ValueError(
      'lpl_loss needs the autoencoder downsample factor: pass downsample_factor= or a features_fn '
      'with a downsample_factor attribute (make_features_fn gives one).'
    )
  image_size = z0.shape[1] * factor
  z0 = jax.lax.stop_gradient(z0)

  if cfg.space == 'image':
    if not hasattr(features_fn, 'decode'):
      raise ValueError("LPLConfig.space='image' needs a features_fn with .decode (use make_features_fn).")
    pred, target = features_fn.decode(z0_hat), jax.lax.stop_gradient(features_fn.decode(z0))
    loss = terms.masked_distance(pred, target, distance=cfg.distance)
    aux = dict(
      layer_loss=loss[:, None],
      outlier_fraction=jnp.zeros_like(loss)[:, None],
      std_ratio=terms.std_ratio(pred, target)[:, None],
      layer_weights=jnp.ones((1,)),
    )
    return _weighted(loss, sample_weights), aux

  depth = cfg.deepest_block
  target_feats = jax.lax.stop_gradient(features_fn(z0, depth))
  pred_feats = features_fn(z0_hat, depth)
  layers = cfg.used_layers
  preds = [_at_least_f32(pred_feats[i]) for i in layers]
  targets = [_at_least_f32(target_feats[i]) for i in layers]
  if cfg.layer_weights is not None:
    weights = cfg.layer_weights
  else:
    weights = terms.depth_weights(cfg.depth_weights, layers, [t.shape[1] for t in targets])
  masks = layer_masks(preds if cfg.mask_source == 'pred' else targets, cfg, image_size)

  layer_losses, fractions, ratios = [], [], []
  for pred, target, mask in zip(preds, targets, masks, strict=True):
    if mask is not None:
      target = jnp.where(mask, target, 0.0)  # Algorithm 1 returns the masked features
    ratios.append(terms.std_ratio(pred, target, mask))
    pred, target = terms.normalize(
      cfg.normalization, pred, target, mask, axis=cfg.norm_axis, stats_gradient=cfg.stats_gradient
    )
    layer_losses.append(terms.masked_distance(pred, target, mask, distance=cfg.distance))
    fractions.append(jnp.zeros(pred.shape[0]) if mask is None else 1.0 - jnp.mean(mask, axis=(1, 2, 3)))

  layer_loss = jnp.stack(layer_losses, axis=1)  # [B, L]
  w = jnp.asarray(weights, jnp.float32)
  loss = jnp.sum(layer_loss * w, axis=1)
  if cfg.reduction == 'mean':
    loss = loss / len(layers)
  aux = dict(
    layer_loss=layer_loss,
    outlier_fraction=jnp.stack(fractions, axis=1),
    std_ratio=jnp.stack(ratios, axis=1),
    layer_weights=w,
  )
  return _weighted(loss, sample_weights), aux


def _at_least_f32(x: jax.Array) -> jax.Array:
  """bf16 features are upcast: the loss and its reductions run in float32 (or float64 when given)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _weighted(loss: jax.Array, sample_weights: jax.Array | None) -> jax.Array:
  if sample_weights is None:
    return loss
  chex.assert_shape(sample_weights, loss.shape)
  return loss * sample_weights


def noise_level_gate(
  alpha: jax.Array, sigma: jax.Array, *, tau: float, resolution: int, base_resolution: int = 256
) -> jax.Array:
  """1.0 where the noise level sigma_t / alpha_t <= tau * resolution / base_resolution, else 0.0 (`[B]`).

  The threshold grows with resolution as the paper's section 4.1 prescribes (after Esser et al. 2024).
  """
  threshold = tau * resolution / base_resolution
  return (sigma <= threshold * alpha).astype(jnp.float32)


def timestep_gate(t: jax.Array, *, threshold: int | float) -> jax.Array:
  """The reference's gate: 1.0 where `t < threshold` (`[B]`)."""
  return (t < threshold).astype(jnp.float32)


def gate_weights(
  cfg: LPLConfig,
  *,
  resolution: int,
  alpha: jax.Array | None = None,
  sigma: jax.Array | None = None,
  t: jax.Array | None = None,
) -> jax.Array | None:
  """Per-sample weights of `cfg.gate` (None for `'none'`)."""
  if cfg.gate == 'none':
    return None
  if cfg.gate == 'snr':
    if alpha is None or sigma is None:
      raise ValueError("LPLConfig.gate='snr' needs alpha and sigma.")
    scale = resolution if cfg.scale_with_resolution else cfg.base_resolution
    return noise_level_gate(alpha, sigma, tau=cfg.tau, resolution=scale, base_resolution=cfg.base_resolution)
  if t is None:
    raise ValueError("LPLConfig.gate='timestep' needs t.")
  return timestep_gate(t, threshold=cfg.t_threshold)


def noise_level_threshold(cfg: LPLConfig, resolution: int, formulation: Any = None) -> float:
  """The sigma/alpha threshold of the gate in force at `resolution`, for the stratified timestep sampler (rows below
  it get LPL): `'snr'`: tau, scaled with the resolution; `'timestep'` (t < t_threshold, the reference): the noise
  level of timestep t_threshold - 1, which the levels of all earlier timesteps are under (they grow with t; a flow's
  t in [0, 1] is read as t_threshold / 1000); `'none'`: infinite.

  Args:
    formulation: the diffusion formulation (`diffusion.get_formulation`); needed by the `'timestep'` gate.
  """
  if cfg.gate == 'none':
    return math.inf
  if cfg.gate == 'timestep':
    if formulation is None:
      raise ValueError("LPLConfig.gate='timestep' needs the formulation to find its noise level.")
    if formulation.is_flow:
      t = jnp.asarray(cfg.t_threshold / formulation.num_timesteps, jnp.float32)
    else:
      t = jnp.asarray(cfg.t_threshold - 1, jnp.int32)
    return float(np.asarray(formulation.noise_level(t)))
  return cfg.tau * (resolution / cfg.base_resolution if cfg.scale_with_resolution else 1.0)
