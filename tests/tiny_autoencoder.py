"""The `tiny` autoencoder preset with random params, made once per test process and seed.

Compiling flax's initialisers for it (hundreds of random draws) takes about half a minute on a CPU, more than most
tests that use it; the LPL, report, feature and train tests share one copy instead of compiling their own.
"""

import functools

import jax
import jax.numpy as jnp

from lpl_jax import autoencoder as ae


@functools.cache
def tiny_autoencoder(seed: int = 0, dtype=jnp.float32):
  """`(model, params)`: the `tiny` preset computing in `dtype`, float32 params drawn from `jax.random.key(seed)`."""
  model = ae.from_preset('tiny', dtype=dtype)
  return model, jax.jit(lambda k: ae.init_params(model, k))(jax.random.key(seed))
