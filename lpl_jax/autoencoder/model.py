"""The KL autoencoder (diffusers `AutoencoderKL` / `AsymmetricAutoencoderKL`) in Flax linen, NHWC.

The decoder's feature taps are what the latent perceptual loss compares: `decoder_features(z, n)` returns
`[mid, up_0, ..., up_{n-1}]`, the outputs of the mid block and of the first `n` up blocks (each after its upsampler),
and computes nothing deeper. For an SD-family decoder and a `[B, 32, 32, 4]` latent these are
`[B,32,32,512]`, `[B,64,64,512]`, `[B,128,128,512]`, `[B,256,256,256]`, `[B,256,256,128]`.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from lpl_jax.autoencoder import layers
from lpl_jax.autoencoder.config import AutoencoderConfig

Dtype = Any
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp.


def _maybe_remat(cls, remat: bool, policy: Any = None):
  return nn.remat(cls, policy=policy) if remat else cls


class Encoder(nn.Module):
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    widths = cfg.block_out_channels
    down_cls = _maybe_remat(layers.DownEncoderBlock, self.remat, self.remat_policy)
    h = layers.conv(widths[0], 3, name='conv_in', **kw)(x)
    for i, width in enumerate(widths):
      h = down_cls(
        width,
        cfg.layers_per_block,
        cfg.norm_num_groups,
        add_downsample=i < len(widths) - 1,
        name=f'down_blocks_{i}',
        **kw,
      )(h)
    h = _maybe_remat(layers.MidBlock, self.remat, self.remat_policy)(
      widths[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name='mid_block', **kw
    )(h)
    h = nn.silu(layers.group_norm(cfg.norm_num_groups, name='conv_norm_out', **kw)(h))
    return layers.conv(2 * cfg.latent_channels, 3, name='conv_out', **kw)(h)


class Decoder(nn.Module):
  """`conv_in -> mid_block -> up_blocks -> GroupNorm/SiLU/conv_out`; optionally mask-conditioned (asymmetric)."""

  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: Any = None

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    widths = cfg.decoder_block_out_channels[::-1]  # deepest first
    up_cls = _maybe_remat(layers.UpDecoderBlock, self.remat, self.remat_policy)
    self.conv_in = layers.conv(widths[0], 3, **kw)
    self.mid_block = _maybe_remat(layers.MidBlock, self.remat, self.remat_policy)(
      widths[0], cfg.norm_num_groups, cfg.mid_block_add_attention, **kw
    )
    self.up_blocks = [
      up_cls(width, cfg.decoder_layers_per_block + 1, cfg.norm_num_groups, add_upsample=i < len(widths) - 1, **kw)
      for i, width in enumerate(widths)
    ]
    self.conv_norm_out = layers.group_norm(cfg.norm_num_groups, **kw)
    self.conv_out = layers.conv(cfg.out_channels, 3, **kw)
    if cfg.asymmetric:
      self.condition_encoder = layers.MaskConditionEncoder(cfg.decoder_block_out_channels[0], widths[0], **kw)

  def features(self, z: jax.Array, num_blocks: int) -> list[jax.Array]:
    """`[mid, up_0, ..., up_{num_blocks-1}]`; blocks past `num_blocks` are never traced."""
    h = self.mid_block(self.conv_in(z))
    feats = [h]
    for block in self.up_blocks[:num_blocks]:
      h = block(h)
      feats.append(h)
    return feats

  def __call__(self, z: jax.Array, image: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    h = self.mid_block(self.conv_in(z))
    if image is not None:
      # diffusers' MaskConditionDecoder: where mask == 1 the decoder's own features are kept, elsewhere the
      # features of the visible (unmasked) image replace them before each up block and at the end.
      cond = self.condition_encoder((1 - mask) * image)
    for block in self.up_blocks:
      if image is not None:
        h = _blend(h, cond, mask)
      h = block(h)
    if image is not None:
      h = _blend(h, cond, mask)
    h = nn.silu(self.conv_norm_out(h))
    return self.conv_out(h)


def _resize_nearest(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`F.interpolate(mode='nearest')`: source index floor(i * in / out)."""
  (h_in, w_in), (h, w) = mask.shape[1:3], size
  rows = (jnp.arange(h) * h_in) // h
  cols = (jnp.arange(w) * w_in) // w
  return mask[:, rows][:, :, cols]


def _blend(h: jax.Array, cond: dict, mask: jax.Array) -> jax.Array:
  key = tuple(h.shape[1:])
  if key not in cond:
    raise ValueError(
      f'the mask-condition encoder has no feature map of shape {key} (it has {sorted(cond)}): '
      'this decoder architecture cannot be mask-conditioned at this resolution.'
    )
  m = _resize_nearest(mask, h.shape[1:3]).astype(h.dtype)
  return h * m + cond[key].astype(h.dtype) * (1 - m)


class AutoencoderKL(nn.Module):
  """KL autoencoder with decoder feature taps.

  Works on raw (unscaled) latents `z [B, h, w, latent_channels]` and NHWC images in [-1, 1]. A diffusion model
  sees `scale_latents(z)`; use `unscale_latents` before `decode`/`decoder_features`.

  Attributes:
    config: the architecture.
    dtype: computation dtype (`jnp.bfloat16` for bf16 compute; parameters stay in `param_dtype`). Features come
      back in this dtype; `decode` returns float32.
    remat: rematerialise each block (`jax.checkpoint`) so the backward pass keeps only block boundaries.
    remat_policy: with `remat`, a `jax.checkpoint_policies` policy: what a block keeps for the backward pass
      besides its boundaries (None: nothing). `lpl.LPLConfig.remat_policy` names one.
  """

  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: Any = None

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, remat_policy=self.remat_policy)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    conv_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, **conv_kw) if cfg.use_quant_conv else None
    self.post_quant_conv = layers.conv(cfg.latent_channels, 1, **conv_kw) if cfg.use_post_quant_conv else None

  @property
  def scaling_factor(self) -> float:
    return self.config.scaling_factor

  @property
  def shift_factor(self) -> float:
    return self.config.shift_factor

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Raw latent -> what the diffusion model sees: `(z - shift_factor) * scaling_factor`."""
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    """Inverse of `scale_latents`: `z / scaling_factor + shift_factor`."""
    return z / self.config.scaling_factor + self.config.shift_factor

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images `[B, H, W, in_channels]` in [-1, 1] -> posterior `(mean, logvar)`, each `[B, H/f, W/f, C]`."""
    self._check_image(x, 'encode')
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.promote_types(moments.dtype, jnp.float32)), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array, image: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Raw latents `[B, h, w, C]` -> images `[B, h*f, w*f, out_channels]` (float32, or float64 for a float64 model).

    `image` `[B, H, W, 3]` and `mask` `[B, H, W, 1]` (1 = region to generate) condition the asymmetric decoder as
    diffusers' `AsymmetricAutoencoderKL.decode(z, image=..., mask=...)` does; both or neither.
    """
    self._check_latents(z, 'decode')
    if (image is None) != (mask is None):
      raise ValueError('decode: pass both `image` and `mask` for mask-conditioned decoding, or neither.')
    if image is not None:
      if not self.config.asymmetric:
        raise ValueError('decode: `image`/`mask` conditioning exists only for AsymmetricAutoencoderKL.')
      chex.assert_rank([image, mask], 4)
      expected = (z.shape[0], z.shape[1] * self.config.downsample_factor, z.shape[2] * self.config.downsample_factor)
      if image.shape[:3] != expected or mask.shape[:3] != expected or mask.shape[-1] != 1:
        raise ValueError(
          f'decode: for latents {z.shape} image must be {expected + (self.config.out_channels,)} '
          f'and mask {expected + (1,)}; got {image.shape} and {mask.shape}.'
        )
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    out = self.decoder(z, image, mask)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))

  def decoder_features(
    self, z: jax.Array, num_blocks: int | None = None, apply_post_quant_conv: bool = True
  ) -> list[jax.Array]:
    """The decoder's intermediate activations for raw latents `z [B, h, w, C]`.

    Args:
      z: raw (unscaled) latents.
      num_blocks: how many up blocks to run (0..num_up_blocks); `None` means all.
      apply_post_quant_conv: `False` feeds `z` to the decoder's `conv_in` directly, as the public LPL reference
        code does; then the features are not exactly those of `decode(z)`.

    Returns:
      `[mid, up_0, ..., up_{num_blocks-1}]`: `1 + num_blocks` arrays `[B, h_l, w_l, C_l]` in `dtype`.
    """
    self._check_latents(z, 'decoder_features')
    n = self.config.num_up_blocks
    num_blocks = n if num_blocks is None else num_blocks
    if not 0 <= num_blocks <= n:
      raise ValueError(f'decoder has {n} up blocks, decoder_features was asked for num_blocks={num_blocks}.')
    if apply_post_quant_conv and self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder.features(z, num_blocks)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean (initialises every parameter of the non-asymmetric model)."""
    return self.decode(self.encode(x)[0])

  def _check_image(self, x: jax.Array, where: str) -> None:
    chex.assert_rank(x, 4)
    f = self.config.downsample_factor
    if x.shape[-1] != self.config.in_channels:
      raise ValueError(
        f'{where}: images have {x.shape[-1]} channels, the autoencoder expects {self.config.in_channels} (NHWC layout).'
      )
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(
        f'{where}: image size {x.shape[1]}x{x.shape[2]} is not a multiple of the downsampling factor {f}.'
      )

  def _check_latents(self, z: jax.Array, where: str) -> None:
    chex.assert_rank(z, 4)
    if z.shape[-1] != self.config.latent_channels:
      raise ValueError(
        f'{where}: latents have {z.shape[-1]} channels, the autoencoder expects '
        f'{self.config.latent_channels} (NHWC layout).'
      )


def init_params(model: AutoencoderKL, key: jax.Array, image_size: int | None = None) -> dict:
  """Random parameters for every tensor of `model` (including the asymmetric decoder's condition encoder)."""
  size = image_size or 2 * model.config.downsample_factor
  x = jnp.zeros((1, size, size, model.config.in_channels), jnp.float32)

  def touch_all(module: AutoencoderKL, x):
    mean, _ = module.encode(x)
    if module.config.asymmetric:
      return module.decode(mean, x, jnp.ones(x.shape[:3] + (1,), x.dtype))
    return module.decode(mean)

  return model.init(key, x, method=touch_all)['params']
