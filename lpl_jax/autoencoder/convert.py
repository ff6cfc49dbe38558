"""Import of diffusers-format autoencoder folders (`config.json` + `diffusion_pytorch_model.safetensors`).

No torch at run time: tensors are read with `safetensors` and renamed mechanically,
`decoder.up_blocks.0.resnets.1.conv1.weight` -> `('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel')`,
with conv kernels `[O, I, kh, kw] -> [kh, kw, I, O]` and linear weights `[O, I] -> [I, O]`. Both attention naming
schemes of published checkpoints are accepted (`query/key/value/proj_attn` and `to_q/to_k/to_v/to_out.0`). Import
is strict: every missing, unexpected or mis-shaped tensor is named in one error.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lpl_jax.autoencoder.config import AutoencoderConfig
from lpl_jax.autoencoder.model import AutoencoderKL, init_params

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


class WeightsMismatchError(ValueError):
  """The weights file does not match the architecture of its config."""


def torch_name_to_path(name: str, ndim: int) -> tuple[str, ...]:
  """`'a.b.0.c.weight'` -> `('a', 'b_0', 'c', 'kernel' | 'scale')`; legacy attention names are modernised."""
  parts = name.split('.')
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
    parts[-2:-1] = _LEGACY_ATTENTION[parts[-2]].split('.')
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  leaf = parts[-1]
  if leaf == 'weight':
    leaf = 'kernel' if ndim in (2, 4) else 'scale'
  return tuple(path) + (leaf,)


def path_to_torch_name(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  modules = [re.sub(r'_(\d+)$', r'.\1', m) for m in modules]
  return '.'.join(modules + ['weight' if leaf in ('kernel', 'scale') else leaf])


def torch_to_flax_array(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return np.transpose(array)
  return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: AutoencoderKL) -> dict:
  """diffusers state dict (name -> array, PyTorch layouts) -> Flax params for `model`, strictly checked."""
  expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  expected = {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(expected).items()}
  converted: dict[tuple[str, ...], np.ndarray] = {}
  origin: dict[tuple[str, ...], str] = {}
  duplicated, unexpected, misshaped, misshaped_paths = [], [], [], set()
  for name, array in state_dict.items():
    path = torch_name_to_path(name, np.ndim(array))
    if path in origin:
      duplicated.append(f'{name} (same tensor as {origin[path]})')
      continue
    if path not in expected:
      unexpected.append(f'{name} {tuple(np.shape(array))}')
      continue
    origin[path] = name
    value = torch_to_flax_array(np.asarray(array))
    if value.shape != expected[path]:
      misshaped.append(f'{name}: file has {tuple(np.shape(array))}, model expects {_torch_shape(expected[path])}')
      misshaped_paths.add(path)
      continue
    converted[path] = value
  missing = [f'{path_to_torch_name(p)} {_torch_shape(s)}' for p, s in expected.items()
             if p not in converted and p not in misshaped_paths]
  problems = []
  for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped),
                       ('given twice', duplicated)):
    if items:
      problems.append(f'{len(items)} {title} tensor(s):\n    ' + '\n    '.join(sorted(items)))
  if problems:
    raise WeightsMismatchError(f'weights do not match the {model.config.class_name} of the config:\n  '
                               + '\n  '.join(problems))
  params = {p: jnp.asarray(v, dtype=model.param_dtype) for p, v in converted.items()}
  return flax.traverse_util.unflatten_dict(params)


def flax_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (current attention names, PyTorch layouts, float32)."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 4:
      value = np.transpose(value, (3, 2, 0, 1))
    elif value.ndim == 2:
      value = np.transpose(value)
    out[path_to_torch_name(path)] = np.ascontiguousarray(value)
  return out


def read_config(folder: str | os.PathLike) -> AutoencoderConfig:
  """The `AutoencoderConfig` of a diffusers-format folder."""
  path = os.path.join(os.fspath(folder), CONFIG_NAME)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'autoencoder folder {os.fspath(folder)!r} does not exist.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path!r} is missing: a diffusers autoencoder folder holds {CONFIG_NAME} and '
                            f'{WEIGHTS_NAME} (as written by save_pretrained).')
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path!r} is not valid JSON: {e}') from e
  return AutoencoderConfig.from_diffusers_config(cfg)


def load_state_dict(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of the folder's safetensors weights (single file or sharded with an index), as NumPy arrays."""
  folder = os.fspath(folder)
  stem, ext = os.path.splitext(WEIGHTS_NAME)
  name = f'{stem}.{variant}{ext}' if variant else WEIGHTS_NAME
  single, index = os.path.join(folder, name), os.path.join(folder, name + '.index.json')
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      files = [os.path.join(folder, shard) for shard in sorted(set(json.load(f)['weight_map'].values()))]
  else:
    present = sorted(os.listdir(folder))
    hint = ' PyTorch .bin weights are not read (no torch at run time); re-save with safe_serialization=True.' if any(
        p.endswith('.bin') for p in present) else ''
    raise FileNotFoundError(f'no weights in {folder!r}: expected {name} (or {name}.index.json); the folder holds '
                            f'{present}.{hint}')
  state = {}
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f'weight shard {file!r} listed in the index is missing.')
    state.update(read_safetensors(file))
  return state


_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a `.safetensors` file as a float32 NumPy array, on the host.

  The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets) and the
  raw data. It is parsed here rather than with `safetensors.safe_open` because that reader has no NumPy bfloat16
  and its flax reader would route every tensor through the accelerator.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    (header_len,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + header_len])
  except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path!r} is not a safetensors file: {e}') from e
  data = memoryview(raw)[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path!r}: tensor {name} has dtype {info["dtype"]}; autoencoder weights must be floating '
                       f'point ({sorted(_SAFETENSORS_DTYPES)}).')
    begin, end = info['data_offsets']
    dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
    if end > len(data) or end - begin != dtype.itemsize * int(np.prod(info['shape'])):
      raise ValueError(f'{path!r}: tensor {name} has inconsistent offsets (truncated file?).')
    out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info['shape']).astype(np.float32)
  return out


def from_diffusers(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   remat: bool = False, variant: str | None = None) -> tuple[AutoencoderKL, dict]:
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
  return model, convert_state_dict(load_state_dict(folder, variant), model)


def save_diffusers(folder: str | os.PathLike, model: AutoencoderKL, params: Mapping[str, Any]) -> None:
  """Writes `model`/`params` as a diffusers-format folder that `from_diffusers` and diffusers' `from_pretrained`
  read."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

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
