"""The patch discriminator of pix2pix / taming / LDM (`NLayerDiscriminator`), NHWC.

`4x4` convolutions: one stride-2 conv with LeakyReLU(0.2), `num_layers - 1` more stride-2 convs and one stride-1
conv (each doubling the width up to 8x, normalised, LeakyReLU), then a stride-1 conv to one logit per patch.
Differences from taming's: GroupNorm instead of BatchNorm (no mutable batch statistics in a pure step, and the
result does not depend on the batch size), conv weights N(0, 0.02) and norm scales N(1, 0.02) as
taming's `weights_init`.

References:
  Isola et al. 2017, Image-to-Image Translation with Conditional Adversarial Networks (the PatchGAN).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)


def _scale_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # taming: norm weights N(1, 0.02)


class PatchDiscriminator(nn.Module):
  """Images `[B, H, W, 3]` -> patch logits `[B, h, w, 1]` (a 32 px input and `num_layers=2` give `6x6`).

  Attributes:
    width: channels of the first conv (taming: 64).
    num_layers: stride-2 convolutions (taming: 3); each halves the side.
    norm_groups: GroupNorm groups of the inner convs.
  """

  width: int = 64
  num_layers: int = 3
  norm_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1))
    conv = lambda f, s, bias=True: nn.Conv(
      f, (4, 4), (s, s), padding=pad, use_bias=bias, kernel_init=_INIT, dtype=self.dtype
    )
    h = nn.leaky_relu(conv(self.width, 2)(x.astype(self.dtype)), 0.2)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = conv(self.width * min(2**n, 8), stride, bias=False)(h)
      h = nn.GroupNorm(self.norm_groups, dtype=self.dtype, scale_init=_scale_init, use_fast_variance=False)(h)
      h = nn.leaky_relu(h, 0.2)
    return conv(1, 1)(h).astype(jnp.float32)
