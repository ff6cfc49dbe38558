"""Tensors of weights files as NumPy arrays on the host: `.safetensors` and `.npz` without torch, torch state dicts
(`.pth`/`.pt`/`.bin`) with it.

Floating-point tensors are returned as `float_dtype` (float32 unless told otherwise: half-precision files are
widened); other tensors (integer counters, masks) keep their dtype, so that a strict import can name them.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

# Little-endian, as the format stores them.
_SAFETENSORS_DTYPES = {
  'F64': np.dtype('<f8'),
  'F32': np.dtype('<f4'),
  'F16': np.dtype('<f2'),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
  'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
  'I64': np.dtype('<i8'),
  'I32': np.dtype('<i4'),
  'I16': np.dtype('<i2'),
  'I8': np.dtype('i1'),
  'U64': np.dtype('<u8'),
  'U32': np.dtype('<u4'),
  'U16': np.dtype('<u2'),
  'U8': np.dtype('u1'),
  'BOOL': np.dtype('?'),
}
# ml_dtypes' floats are not `np.floating` subtypes for NumPy.
_ML_FLOATS = frozenset(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))
TORCH_EXTENSIONS = ('.pth', '.pt', '.bin')


def is_float(dtype: Any) -> bool:
  """Whether `dtype` is a floating-point type, bfloat16 and float8 included."""
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.floating) or dtype in _ML_FLOATS


def _cast(array: np.ndarray, float_dtype: Any) -> np.ndarray:
  return array.astype(float_dtype) if float_dtype is not None and is_float(array.dtype) else array


def read_safetensors(path: str | os.PathLike, *, float_dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Every tensor of a `.safetensors` file.

  The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets) and the
  raw data. It is parsed here rather than with `safetensors.safe_open` because that reader has no NumPy bfloat16
  and its flax reader would route every tensor through the accelerator. Tensors are read one at a time, so the
  memory held is that of the result (with `float_dtype=None`, the file's own size).

  Args:
    path: the file.
    float_dtype: dtype of the returned floating-point tensors; `None` keeps the stored one.

  Raises:
    ValueError: the file is not a safetensors file, is truncated, or holds a dtype this reader does not know.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    try:
      (header_len,) = struct.unpack('<Q', f.read(8))
      if header_len > size - 8:
        raise ValueError(f'its header length {header_len} exceeds the file size {size}')
      header = json.loads(f.read(header_len))
      if not isinstance(header, dict) or not all(
        isinstance(info, dict) and {'dtype', 'shape', 'data_offsets'} <= info.keys()
        for name, info in header.items()
        if name != '__metadata__'
      ):
        raise ValueError('its header is not a JSON object of tensor entries (dtype, shape, data_offsets)')
    except (struct.error, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
      raise ValueError(f'{path!r} is not a safetensors file: {e}') from e
    base = 8 + header_len
    out = {}
    for name, info in header.items():
      if name == '__metadata__':
        continue
      if info['dtype'] not in _SAFETENSORS_DTYPES:
        raise ValueError(
          f'{path!r}: tensor {name} has dtype {info["dtype"]}, which this reader does not know '
          f'({sorted(_SAFETENSORS_DTYPES)}).'
        )
      dtype, shape = _SAFETENSORS_DTYPES[info['dtype']], tuple(info['shape'])
      begin, end = info['data_offsets']
      if base + end > size or end - begin != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f'{path!r}: tensor {name} has inconsistent offsets (truncated file?).')
      buffer = bytearray(end - begin)  # writable, unlike the bytes `read` returns
      f.seek(base + begin)
      f.readinto(buffer)
      out[name] = _cast(np.frombuffer(buffer, dtype=dtype).reshape(shape), float_dtype)
  return out


def find_safetensors(folder: str | os.PathLike, name: str, *, variant: str | None = None) -> list[str]:
  """The files of a diffusers/transformers weights file in `folder`: `[name]` itself, or the shards its
  `name.index.json` lists (as `save_pretrained` writes large models), in order.

  Args:
    folder: the model folder.
    name: the weights file, e.g. `'diffusion_pytorch_model.safetensors'`.
    variant: e.g. `'fp16'` for `diffusion_pytorch_model.fp16.safetensors`.

  Raises:
    FileNotFoundError: neither the file nor its index is there (PyTorch `.bin` weights are named as unreadable), or
      a shard the index lists is missing.
    ValueError: the index is not JSON with a `weight_map`.
  """
  folder = os.fspath(folder)
  if variant:
    stem, ext = os.path.splitext(name)
    name = f'{stem}.{variant}{ext}'
  single, index = os.path.join(folder, name), os.path.join(folder, name + '.index.json')
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{index!r} is not a weights index (JSON with a weight_map): {e!r}') from e
    files = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f'weight shard {file!r} listed in the index is missing.')
    return files
  present = sorted(os.listdir(folder))
  hint = (
    ' PyTorch .bin weights are not read (no torch at run time); re-save with safe_serialization=True.'
    if any(p.endswith('.bin') for p in present)
    else ''
  )
  raise FileNotFoundError(
    f'no weights in {folder!r}: expected {name} (or {name}.index.json); the folder holds {present}.{hint}'
  )


def read_safetensors_folder(
  folder: str | os.PathLike, name: str, *, variant: str | None = None, float_dtype: Any = np.float32
) -> dict[str, np.ndarray]:
  """Every tensor of a diffusers/transformers weights file in `folder`: `name` itself, or the shards its
  `name.index.json` lists (`find_safetensors`).

  Args:
    folder: the model folder.
    name: the weights file, e.g. `'diffusion_pytorch_model.safetensors'`.
    variant: e.g. `'fp16'` for `diffusion_pytorch_model.fp16.safetensors`.
    float_dtype: as in `read_safetensors`.

  Raises:
    FileNotFoundError: as `find_safetensors`.
  """
  state = {}
  for file in find_safetensors(folder, name, variant=variant):
    state.update(read_safetensors(file, float_dtype=float_dtype))
  return state


def read_npz(path: str | os.PathLike, *, float_dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file (no pickled objects)."""
  with np.load(os.fspath(path), allow_pickle=False) as data:
    return {k: _cast(data[k], float_dtype) for k in data.files}


def read_torch_state_dict(
  path: str | os.PathLike, *, float_dtype: Any = np.float32, no_torch_hint: str = '', select: Sequence[str] = ()
) -> dict[str, np.ndarray]:
  """A state dict saved with `torch.save` (name -> tensor), loaded with `weights_only=True`.

  Args:
    path: the file.
    float_dtype: dtype of the returned floating-point tensors; `None` keeps the stored one (bfloat16 included).
    no_torch_hint: what to do instead, appended to the error when torch is not installed.
    select: keys under which a training checkpoint nests its state dicts, in order of preference: the first
      present whose value is a mapping is read (DiT's `train.py` saves `{'model', 'ema', 'opt', 'args'}`;
      `select=('ema', 'model')` reads the EMA weights). A file that holds none of them is read as it is. With
      `select`, an `argparse.Namespace` anywhere in the file (training scripts save their arguments) is allowed.

  Raises:
    ImportError: torch is not installed.
    ValueError: the file is not a torch file that loads with `weights_only=True`, or holds something other than a
      flat mapping of names to tensors (e.g. a training checkpoint with the state dicts nested under keys that
      `select` does not name).
  """
  path = os.fspath(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f'reading the torch state dict {path!r} needs PyTorch, which is not installed. {no_torch_hint}'.rstrip()
    ) from e
  allowed = [argparse.Namespace] if select else []
  try:
    with torch.serialization.safe_globals(allowed):
      state = torch.load(path, map_location='cpu', weights_only=True)
  except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
    first_line = (str(e).strip().splitlines() or [''])[0]
    raise ValueError(
      f'{path!r} could not be read as a torch file with weights_only=True: {type(e).__name__}: {first_line}'
    ) from e
  if not isinstance(state, Mapping):
    raise ValueError(f'{path!r} holds a {type(state).__name__}, expected a state dict (name -> tensor).')
  nested = [k for k in select if isinstance(state.get(k), Mapping)]
  if nested:
    state = state[nested[0]]
  others = sorted(f'{k} ({type(v).__name__})' for k, v in state.items() if not isinstance(v, torch.Tensor))
  if others:
    raise ValueError(f'{path!r} is not a flat state dict (name -> tensor): {", ".join(others)}.')

  def to_numpy(tensor):
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and float_dtype is not None:
      # Through float64, which holds every torch float exactly (float8 and bfloat16 have no `.numpy()`).
      return tensor.double().numpy().astype(float_dtype)
    if tensor.dtype == torch.bfloat16:  # kept as stored: ml_dtypes' bfloat16, by bit pattern
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()

  return {k: to_numpy(v) for k, v in state.items()}


def read_tensors(
  path: str | os.PathLike, *, float_dtype: Any = np.float32, no_torch_hint: str = ''
) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors`, `.npz` or torch (`.pth`/`.pt`/`.bin`) file, by its extension.

  Raises:
    FileNotFoundError: there is no such file.
    ValueError: the extension is none of these, or the file is not what it says.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file {path!r} does not exist.')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    return read_safetensors(path, float_dtype=float_dtype)
  if ext == '.npz':
    return read_npz(path, float_dtype=float_dtype)
  if ext in TORCH_EXTENSIONS:
    return read_torch_state_dict(path, float_dtype=float_dtype, no_torch_hint=no_torch_hint)
  raise ValueError(f'{path!r}: unknown weights format {ext!r}; expected .safetensors, .npz or .pth/.pt/.bin (torch).')
