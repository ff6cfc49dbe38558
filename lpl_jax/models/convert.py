"""Pretrained denoiser weights in and out: diffusers folders (DiT, SD3's MMDiT) and facebookresearch/DiT `.pt` files.

  from_diffusers(folder) -> (model, params)        `DiTTransformer2DModel` -> `DiT`,
                                                   `SD3Transformer2DModel` -> text-conditional `MMDiT`
  save_diffusers(folder, model, params)            the inverse; diffusers' `from_pretrained` reads it
  dit_from_pytorch_checkpoint(path) -> (model, params)   DiT's own `.pt` files (torch needed)

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors`, or the shards its
`diffusion_pytorch_model.safetensors.index.json` lists; float32, float16 and bfloat16 files are read without torch.
The model is built from the config, the tensors are renamed and re-laid out by the rules of `convert_dit` and
`convert_sd3` (`convert_layout` describes them), and the import is strict: one `WeightsMismatchError` names every
missing, unexpected, mis-shaped, non-floating-point or doubly given (e.g. in two shards) tensor, and the file. Fixed
tensors that the file stores and our models compute (SD3's `pos_embed.pos_embed`, DiT's `pos_embed`) must equal
what the model computes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import weights
from lpl_jax.models import convert_dit, convert_sd3
from lpl_jax.models import convert_layout as C
from lpl_jax.models.convert_dit import from_pytorch_checkpoint as dit_from_pytorch_checkpoint
from lpl_jax.models.dit import DiT
from lpl_jax.models.mmdit import MMDiT

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
KNOWN_CLASSES = ('DiTTransformer2DModel', 'Transformer2DModel (norm_type ada_norm_zero)', convert_sd3.CLASS_NAME)

__all__ = ['dit_from_pytorch_checkpoint', 'from_diffusers', 'read_config', 'save_diffusers']


def read_config(folder: str | os.PathLike) -> tuple[dict[str, Any], str]:
  """`(config, path of config.json)` of a diffusers model folder.

  Raises:
    FileNotFoundError: the folder or its `config.json` is missing.
    ValueError: `config.json` is not a JSON object.
  """
  folder = os.fspath(folder)
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'denoiser folder {folder!r} does not exist.')
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{path!r} is missing: a diffusers model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} (as written by '
      'save_pretrained).'
    )
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path!r} is not valid JSON: {e}') from e
  if not isinstance(cfg, dict):
    raise ValueError(f'{path!r} holds a JSON {type(cfg).__name__}, expected an object of config fields.')
  return cfg, path


def _describe_files(files: list[str], folder: str, variant: str | None) -> str:
  """How errors name the weights: the file, or the index of its shards."""
  stem, ext = os.path.splitext(WEIGHTS_NAME)
  single = os.path.join(folder, f'{stem}.{variant}{ext}' if variant else WEIGHTS_NAME)
  return repr(files[0]) if files == [single] else f'the {len(files)} shard(s) of {single + ".index.json"!r}'


def from_diffusers(
  folder: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
  variant: str | None = None,
) -> tuple[DiT | MMDiT, dict]:
  """Loads a diffusers denoiser folder: a `DiTTransformer2DModel` as our `DiT`, an `SD3Transformer2DModel` as our
  text-conditional `MMDiT` (with SD3's cropped positional table when the config has `pos_embed_max_size`).

  Args:
    folder: holds `config.json` and `diffusion_pytorch_model[.variant].safetensors` (or its sharded index).
    dtype: computation dtype of the returned module (e.g. `jnp.bfloat16`).
    param_dtype: dtype of the returned parameters (the file's are cast).
    remat: rematerialise each block in the backward pass.
    variant: weights variant, e.g. `'fp16'` for `diffusion_pytorch_model.fp16.safetensors`.

  Returns:
    `(model, params)`, params a nested dict of `param_dtype` jax arrays with the structure of
    `nn.unbox(model.init(...)['params'])`: `model.apply({'params': params}, x, t, y)` (DiT) or
    `model.apply({'params': params}, x, t, context=ctx, pooled=pooled)` (MMDiT), NHWC.

  Raises:
    ValueError: an unknown `_class_name`, or a config field our models cannot express (naming `config.json` and the
      field).
    WeightsMismatchError: the weights do not match the config (naming the file and every tensor at fault).
  """
  folder = os.fspath(folder)
  cfg, config_path = read_config(folder)
  name = cfg.get('_class_name')
  kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
  if name == 'DiTTransformer2DModel' or (name == 'Transformer2DModel' and cfg.get('norm_type') == 'ada_norm_zero'):
    model, kind = convert_dit.model_from_config(cfg, repr(config_path), **kwargs), convert_dit
  elif name == convert_sd3.CLASS_NAME:
    model, kind = convert_sd3.model_from_config(cfg, repr(config_path), **kwargs), convert_sd3
  else:
    raise ValueError(
      f'{config_path!r}: _class_name {name!r} is not a denoiser this importer knows; expected one of '
      f'{", ".join(KNOWN_CLASSES)}.'
    )
  files = weights.find_safetensors(folder, WEIGHTS_NAME, variant=variant)
  source = _describe_files(files, folder, variant)
  # Tensors keep the file's dtype until the final cast; a name in two shards reaches the strict check twice.
  tensors = (
    (n, v, f'{n} (in {os.path.basename(file)})' if len(files) > 1 else n)
    for file in files
    for n, v in weights.read_safetensors(file, float_dtype=None).items()
  )
  target = f'the {name} of {config_path!r} (weights: {source})'
  params = kind.import_diffusers(tensors, model, source=source, target=target)
  return model, C.cast(params, param_dtype)


def save_diffusers(
  folder: str | os.PathLike,
  model: DiT | MMDiT,
  params: Mapping[str, Any],
  *,
  sample_size: int | None = None,
  dtype: Any = np.float32,
) -> None:
  """Writes `model`/`params` as a diffusers folder (`config.json`, `diffusion_pytorch_model.safetensors`) that
  `from_diffusers` and diffusers' `from_pretrained` read: a `DiT` as `DiTTransformer2DModel` (its one timestep and
  label embedder copied into every block, as diffusers expects), a text-conditional `MMDiT` as
  `SD3Transformer2DModel`. Each file is written under a temporary name and renamed, so a reader never sees a
  half-written file.

  Args:
    folder: created if missing; files of the same names are replaced.
    model, params: the denoiser and its (possibly boxed) parameters.
    sample_size: the latent side recorded in the config, at which diffusers' positions equal ours (it interpolates
      them at other sides; default 32 for DiT, 128 for MMDiT). An MMDiT with `pos_embed_max_size` derives it.
    dtype: dtype of the written weights (e.g. `jnp.bfloat16`); None keeps each parameter's own. The positional table
      of an SD3 export is float32.

  Raises:
    ValueError: nothing written: the model has no diffusers counterpart (adaLN-single, a class-conditional MMDiT, ...)
      or `params` are not this model's.
    TypeError: `model` is neither a `DiT` nor an `MMDiT`.
  """
  from safetensors.numpy import save_file

  if isinstance(model, DiT):
    config = convert_dit.diffusers_config(model, 32 if sample_size is None else sample_size)
    rules, shapes, buffers = convert_dit.diffusers_rules(model), convert_dit.param_shapes(model), {}
  elif isinstance(model, MMDiT):
    config = convert_sd3.diffusers_config(model, sample_size)
    rules, shapes, buffers = (
      convert_sd3.rules(model),
      convert_sd3.param_shapes(model),
      convert_sd3.export_buffers(model),
    )
  else:
    raise TypeError(f'save_diffusers writes a DiT or an MMDiT, got {type(model).__name__}.')
  params = jax.tree.map(np.asarray, nn.unbox(params))
  mismatch = C.param_mismatch(params, shapes)
  if mismatch:
    raise ValueError(
      f'save_diffusers: params are not those of the given {type(model).__name__}: ' + '; '.join(mismatch[:10])
    )
  cast = (lambda a: np.asarray(a)) if dtype is None else (lambda a: np.asarray(a).astype(dtype))
  state = {k: np.ascontiguousarray(cast(v)) for k, v in C.to_state_dict(rules, params, np).items()}
  state |= {k: np.ascontiguousarray(v, np.float32) for k, v in buffers.items()}

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  weights_tmp, config_tmp = (os.path.join(folder, f'.{name}.tmp') for name in (WEIGHTS_NAME, CONFIG_NAME))
  save_file(state, weights_tmp, metadata={'format': 'pt'})
  with open(config_tmp, 'w') as f:
    json.dump(config, f, indent=2)
  os.replace(weights_tmp, os.path.join(folder, WEIGHTS_NAME))
  os.replace(config_tmp, os.path.join(folder, CONFIG_NAME))
