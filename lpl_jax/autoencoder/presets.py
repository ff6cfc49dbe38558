"""Architectures (and latent scaling) of published KL autoencoders, without weights.

Transcribed from the `config.json` files the model owners publish; `from_diffusers` always reads the folder's
own config, so these only matter where no folder is at hand (shapes, benchmarks, tests, the demo).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lpl_jax.autoencoder.config import AutoencoderConfig
from lpl_jax.autoencoder.model import AutoencoderKL

_SD = dict(
  block_out_channels=(128, 256, 512, 512),
  decoder_block_out_channels=(128, 256, 512, 512),
  layers_per_block=2,
  decoder_layers_per_block=2,
  norm_num_groups=32,
)

PRESETS: dict[str, AutoencoderConfig] = {
  # Stable Diffusion 1.x / 2.x VAE (the LDM f8c4 autoencoder).
  'sd1': AutoencoderConfig(**_SD, latent_channels=4, scaling_factor=0.18215),
  # SDXL VAE: same architecture, retrained decoder, its own scale; the paper's ablation autoencoder.
  'sdxl': AutoencoderConfig(**_SD, latent_channels=4, scaling_factor=0.13025),
  # SD3 VAE: 16 latent channels, no quant convolutions, shifted latents.
  'sd3': AutoencoderConfig(
    **_SD,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
  ),
  # FLUX.1 VAE.
  'flux': AutoencoderConfig(
    **_SD,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
  ),
  # Asymmetric autoencoder x1.5 of Zhu et al. 2023 (SD encoder, 1.5x wider and deeper decoder): the paper's
  # main-results autoencoder.
  'asymmetric_x1_5': AutoencoderConfig(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    decoder_block_out_channels=(192, 384, 768, 768),
    decoder_layers_per_block=3,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    asymmetric=True,
  ),
  # A small f8c4 autoencoder for CPU tests and the demo (four levels, so the same five feature taps exist).
  'tiny': AutoencoderConfig(
    block_out_channels=(32, 64, 128, 128),
    decoder_block_out_channels=(32, 64, 128, 128),
    layers_per_block=1,
    decoder_layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=1.0,
  ),
}


def from_preset(
  name: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False
) -> AutoencoderKL:
  """The module of a named architecture (see `PRESETS`); initialise with `init_params` or load weights."""
  if name not in PRESETS:
    raise ValueError(f'unknown autoencoder preset {name!r}; known: {sorted(PRESETS)}.')
  return AutoencoderKL(PRESETS[name], dtype=dtype, param_dtype=param_dtype, remat=remat)
