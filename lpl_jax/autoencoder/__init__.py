"""Flax KL autoencoders (diffusers AutoencoderKL / AsymmetricAutoencoderKL compatible) with decoder feature taps."""

from lpl_jax.autoencoder.config import AutoencoderConfig
from lpl_jax.autoencoder.convert import from_diffusers, read_config, save_diffusers
from lpl_jax.autoencoder.load import load_autoencoder
from lpl_jax.autoencoder.model import AutoencoderKL, init_params
from lpl_jax.autoencoder.posterior import kl_divergence, sample_posterior
from lpl_jax.autoencoder.presets import PRESETS, from_preset
from lpl_jax.weights import WeightsMismatchError

__all__ = [
  'AutoencoderConfig',
  'AutoencoderKL',
  'PRESETS',
  'WeightsMismatchError',
  'from_diffusers',
  'from_preset',
  'init_params',
  'kl_divergence',
  'load_autoencoder',
  'read_config',
  'sample_posterior',
  'save_diffusers',
]
