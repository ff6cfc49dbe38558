"""The diagonal Gaussian posterior `q(z | x) = N(mean, exp(logvar))` returned by `AutoencoderKL.encode`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """`z = mean + exp(logvar / 2) * eps`, eps ~ N(0, I); shapes `[B, h, w, C]`."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over `[h, w, C]`, per sample `[B]` (diffusers' `kl()`)."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
