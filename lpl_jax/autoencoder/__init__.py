"""Flax KL autoencoders (diffusers AutoencoderKL / AsymmetricAutoencoderKL compatible) with decoder feature taps."""

from lpl_jax.autoencoder.config import AutoencoderConfig
from lpl_jax.autoencoder.convert import WeightsMismatchError, from_diffusers, read_config, save_diffusers
from lpl_jax.autoencoder.model import AutoencoderKL, init_params
from lpl_jax.autoencoder.posterior import kl_divergence, sample_posterior
from lpl_jax.autoencoder.presets import PRESETS, from_preset

__all__ = [
    'AutoencoderConfig', 'AutoencoderKL', 'PRESETS', 'WeightsMismatchError', 'from_diffusers', 'from_preset',
    'init_params', 'kl_divergence', 'read_config', 'sample_posterior', 'save_diffusers',
]
