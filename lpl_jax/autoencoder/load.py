"""One loader for every entry point: an autoencoder from a diffusers-format folder or, without weights, a preset."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from lpl_jax.autoencoder.convert import from_diffusers
from lpl_jax.autoencoder.model import AutoencoderKL, init_params
from lpl_jax.autoencoder.presets import PRESETS, from_preset


def load_autoencoder(spec: str, *, dtype: Any = jnp.float32, seed: int = 0) -> tuple[AutoencoderKL, Any, bool]:
  """`(model, params, random_weights)` from a diffusers-format folder or a preset name.

  Args:
    spec: a folder holding `config.json` and the safetensors weights (read by `from_diffusers`), or a name of
      `PRESETS`, which has no weights: its parameters are `init_params(model, jax.random.key(seed))`, the encoder
      and the decoder, random.
    dtype: computation dtype of the module (the parameters are float32).
    seed: seed of a preset's random parameters.

  Returns:
    The module, its parameters as host arrays (`jax.device_get`: the caller places them), and whether they are
    random (a preset), which a caller should say loudly: such latents and features are not a trained model's.

  Raises:
    ValueError: `spec` is neither an existing folder nor a preset name.
  """
  if os.path.isdir(spec):
    model, params = from_diffusers(spec, dtype=dtype)
    return model, jax.device_get(params), False
  if spec in PRESETS:
    model = from_preset(spec, dtype=dtype)
    # Initialised inside jit: op by op, each of the many small initialisers would be dispatched (and on CPU
    # compiled) separately.
    params = jax.jit(lambda key: init_params(model, key))(jax.random.key(seed))
    return model, jax.device_get(params), True
  raise ValueError(
    f'autoencoder {spec!r} is neither a diffusers autoencoder folder (no such folder exists) nor a '
    f'preset; known presets: {sorted(PRESETS)}.'
  )
