"""Import of diffusers-format autoencoder folders (`config.json` + `diffusion_pytorch_model.safetensors`).

No torch at run time: tensors are read with `lpl_jax.weights.read_safetensors_folder` and renamed mechanically,
`decoder.up_blocks.0.resnets.1.conv1.weight` -> `('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel')`,
with conv kernels `[O, I, kh, kw] -> [kh, kw, I, O]` and linear weights `[O, I] -> [I, O]`. Both attention naming
schemes of published checkpoints are accepted (`query/key/value/proj_attn` and `to_q/to_k/to_v/to_out.0`). Import
is strict (`lpl_jax.weights.match_params`): every missing, unexpected, mis-shaped or doubly given tensor is named in
one `WeightsMismatchError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import weights
from lpl_jax.autoencoder.config import AutoencoderConfig
from lpl_jax.autoencoder.model import AutoencoderKL, init_params
from lpl_jax.weights import Path, path_to_torch_name, read_safetensors_folder

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def torch_name_to_path(name: str, ndim: int) -> Path:
  """`'a.b.0.c.weight'` -> `('a', 'b_0', 'c', 'kernel' | 'scale')`; legacy attention names are modernised."""
  parts = name.split('.')
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
    parts[-2:-1] = _LEGACY_ATTENTION[parts[-2]].split('.')
  return weights.torch_name_to_path('.'.join(parts), ndim)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: AutoencoderKL) -> dict:
  """diffusers state dict (name -> array, PyTorch layouts) -> Flax params for `model`, strictly checked.

  Raises:
    WeightsMismatchError: naming every missing, unexpected, mis-shaped or doubly given tensor (a legacy and a
      current attention name for one tensor).
  """
  expected = weights.expected_shapes(lambda: init_params(model, jax.random.key(0)))
  tensors = (
    (name, torch_name_to_path(name, np.ndim(array)), weights.torch_to_flax(np.asarray(array)))
    for name, array in state_dict.items()
  )
  converted = weights.match_params(tensors, expected, target=f'the {model.config.class_name} of the config')
  params = {p: jnp.asarray(v, dtype=model.param_dtype) for p, v in converted.items()}
  return flax.traverse_util.unflatten_dict(params)


def flax_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (current attention names, PyTorch layouts, float32)."""
  return {
    path_to_torch_name(path): np.ascontiguousarray(weights.flax_to_torch(np.asarray(value, np.float32)))
    for path, value in flax.traverse_util.flatten_dict(params).items()
  }


def read_config(folder: str | os.PathLike) -> AutoencoderConfig:
  """The `AutoencoderConfig` of a diffusers-format folder."""
  path = os.path.join(os.fspath(folder), CONFIG_NAME)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'autoencoder folder {os.fspath(folder)!r} does not exist.')
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{path!r} is missing: a diffusers autoencoder folder holds {CONFIG_NAME} and '
      f'{WEIGHTS_NAME} (as written by save_pretrained).'
    )
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path!r} is not valid JSON: {e}') from e
  return AutoencoderConfig.from_diffusers_config(cfg)


def from_diffusers(
  folder: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
  variant: str | None = None,
) -> tuple[AutoencoderKL, dict]:
  """Loads a diffusers-format `AutoencoderKL` / `AsymmetricAutoencoderKL` folder.

  Args:
    folder: holds `config.json` and `diffusion_pytorch_model[.variant].safetensors` (as `save_pretrained` writes).
    dtype: computation dtype of the returned module (e.g. `jnp.bfloat16`).
    param_dtype: dtype of the returned parameters.
    remat: rematerialise each encoder/decoder block in the backward pass.
    variant: weights variant, e.g. `'fp16'` for `diffusion_pytorch_model.fp16.safetensors`.

  Returns:
    `(model, params)`, to be used as `model.apply({'params': params}, z, method=model.decode)`.
  """
  config = read_config(folder)
  model = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
  return model, convert_state_dict(read_safetensors_folder(folder, WEIGHTS_NAME, variant=variant), model)


def save_diffusers(folder: str | os.PathLike, model: AutoencoderKL, params: Mapping[str, Any]) -> None:
  """Writes `model`/`params` as a diffusers-format folder that `from_diffusers` and diffusers' `from_pretrained`
  read."""
  from safetensors.numpy import save_file

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  config = model.config.to_diffusers_config()  # raises before anything is written if not expressible
  # Each file is written under a temporary name and renamed, so a reader never sees a half-written file.
  weights_tmp, config_tmp = (os.path.join(folder, f'.{name}.tmp') for name in (WEIGHTS_NAME, CONFIG_NAME))
  save_file(flax_to_state_dict(params), weights_tmp)
  with open(config_tmp, 'w') as f:
    json.dump(config, f, indent=2)
  os.replace(weights_tmp, os.path.join(folder, WEIGHTS_NAME))
  os.replace(config_tmp, os.path.join(folder, CONFIG_NAME))
