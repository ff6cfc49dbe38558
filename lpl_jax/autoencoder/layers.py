"""Building blocks of the KL autoencoder, NHWC, equivalent to diffusers' `ResnetBlock2D`, `Attention` (the
single-head VAE self-attention), `Downsample2D`/`Upsample2D`, `DownEncoderBlock2D`, `UpDecoderBlock2D`,
`UNetMidBlock2D` and `MaskConditionEncoder`.

Submodule names mirror the diffusers state-dict names (`resnets_0` for `resnets.0`, `to_out_0` for `to_out.0`), so
weight import is a mechanical renaming. Parameters are kept in `param_dtype`; computation runs in `dtype`, with
normalisation statistics and the attention softmax in at least float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_EPS = 1e-6  # diffusers' resnet_eps for every VAE GroupNorm.


def _at_least_f32(dtype: Dtype) -> Dtype:
  return jnp.promote_types(dtype, jnp.float32)


def group_norm(groups: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
  # use_fast_variance=False: E[x^2]-E[x]^2 loses precision on decoder features with large means.
  return nn.GroupNorm(
    num_groups=groups, epsilon=_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
  )


def conv(
  features: int,
  kernel: int,
  dtype: Dtype,
  param_dtype: Dtype,
  *,
  stride: int = 1,
  padding: Any = 'SAME_TORCH',
  name: str | None = None,
) -> nn.Conv:
  if padding == 'SAME_TORCH':  # PyTorch's symmetric padding=k//2.
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widths differ) shortcut."""

  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(group_norm(self.groups, self.dtype, self.param_dtype, 'norm1')(x))
    h = conv(self.out_channels, 3, self.dtype, self.param_dtype, name='conv1')(h)
    h = nn.silu(group_norm(self.groups, self.dtype, self.param_dtype, 'norm2')(h))
    h = conv(self.out_channels, 3, self.dtype, self.param_dtype, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, self.param_dtype, name='conv_shortcut')(x)
    return x.astype(h.dtype) + h


class SelfAttention(nn.Module):
  """Single-head spatial self-attention with a residual connection (the VAE mid block's attention).

  diffusers builds it with `heads = channels // attention_head_dim = 1`, so the whole width is one head and the
  softmax scale is `channels ** -0.5`.
  """

  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = group_norm(self.groups, self.dtype, self.param_dtype, 'group_norm')(x).reshape(b, h * w, c)
    q, k, v = dense('to_q')(y), dense('to_k')(y), dense('to_v')(y)
    logits = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=_at_least_f32(q.dtype)) * (c**-0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = dense('to_out_0')(jnp.einsum('bqk,bkc->bqc', weights, v))
    return x.astype(out.dtype) + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """ResNet -> attention -> ResNet at the lowest resolution (`UNetMidBlock2D` with one layer)."""

  channels: int
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock(self.channels, name='resnets_0', **kw)(x)
    if self.add_attention:
      x = SelfAttention(name='attentions_0', **kw)(x)
    return ResnetBlock(self.channels, name='resnets_1', **kw)(x)


class DownEncoderBlock(nn.Module):
  """`num_layers` ResNet blocks, then (except at the deepest level) a stride-2 conv.

  diffusers' encoder downsampler pads only bottom and right by one (`downsample_padding=0`).
  """

  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, self.param_dtype, name=f'resnets_{i}')(x)
    if self.add_downsample:
      x = DownsampleConv(self.out_channels, self.dtype, self.param_dtype, name='downsamplers_0')(x)
    return x


class DownsampleConv(nn.Module):
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(self.channels, 3, self.dtype, self.param_dtype, stride=2, padding=((0, 1), (0, 1)), name='conv')(x)


class UpsampleConv(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.channels, 3, self.dtype, self.param_dtype, name='conv')(x)


class UpDecoderBlock(nn.Module):
  """`num_layers` ResNet blocks, then (except at the last level) a x2 upsampler. Its output is one LPL tap."""

  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, self.param_dtype, name=f'resnets_{i}')(x)
    if self.add_upsample:
      x = UpsampleConv(self.out_channels, self.dtype, self.param_dtype, name='upsamplers_0')(x)
    return x


def mask_condition_channels(out_ch: int, res_ch: int, stride: int = 16) -> list[int]:
  """Output widths of `MaskConditionEncoder`'s conv stack, derived exactly as diffusers does."""
  pairs = []
  while stride > 1:
    stride //= 2
    in_ch = out_ch * 2
    out_ch = min(out_ch, res_ch)
    if stride == 1:
      in_ch = res_ch
    pairs.append((in_ch, out_ch))
    out_ch *= 2
  return [o for _, o in pairs] + [pairs[-1][0]]


class MaskConditionEncoder(nn.Module):
  """The asymmetric decoder's encoder of the masked image: a conv stack whose outputs (before ReLU) are matched to
  the decoder's up-block inputs by shape, as diffusers' `MaskConditionEncoder` keys them by `str(shape)`."""

  out_ch: int
  res_ch: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[tuple[int, int, int], jax.Array]:
    outs = {}
    for i, ch in enumerate(mask_condition_channels(self.out_ch, self.res_ch)):
      if i < 2:
        x = conv(ch, 3, self.dtype, self.param_dtype, name=f'layers_{i}')(x)
      else:
        x = conv(ch, 4, self.dtype, self.param_dtype, stride=2, padding=((1, 1), (1, 1)), name=f'layers_{i}')(x)
      outs[tuple(x.shape[1:])] = x  # a later layer of the same shape replaces an earlier one, as in diffusers
      x = nn.relu(x)
    return outs
