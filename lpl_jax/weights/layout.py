"""PyTorch <-> Flax parameter names and array layouts.

A PyTorch state dict names a tensor by its module path, `'decoder.up_blocks.0.resnets.1.conv1.weight'`; a Flax
parameter tree reaches the same tensor by `('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel')`: a numeric
part (an entry of an `nn.ModuleList`/`nn.Sequential`) joins the module name before it, and `weight` is called
`kernel` in linear and conv layers and `scale` in norms. Conv kernels are `[O, I, kh, kw]` in PyTorch and
`[kh, kw, I, O]` in Flax, linear weights `[O, I]` and `[I, O]`; everything else keeps its layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

Path = tuple[str, ...]

_NUMBERED = re.compile(r'_(\d+)$')


def torch_name_to_path(name: str, ndim: int, *, leaves: Mapping[str, str] | None = None) -> Path:
  """`'a.b.0.c.weight'` -> `('a', 'b_0', 'c', 'kernel')` for a tensor of rank `ndim`.

  `weight` becomes `kernel` for 2-D and 4-D tensors (linear and conv layers) and `scale` otherwise (norms); `leaves`
  renames other last parts (e.g. `{'running_mean': 'mean'}` for batch-norm statistics stored as parameters).
  """
  parts = name.split('.')
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  leaf = parts[-1]
  if leaf == 'weight':
    leaf = 'kernel' if ndim in (2, 4) else 'scale'
  elif leaves and leaf in leaves:
    leaf = leaves[leaf]
  return tuple(path) + (leaf,)


def path_to_torch_name(path: Path, *, leaves: Mapping[str, str] | None = None, numbered: bool = True) -> str:
  """The inverse of `torch_name_to_path` (with the same `leaves`).

  `numbered=True` reads a trailing `_<digits>` of a module name as a list index (`'b_0'` -> `'b.0'`); networks whose
  module names themselves end in digits (Inception's `branch7x7_1`) pass `numbered=False`.
  """
  *modules, leaf = path
  if numbered:
    modules = [_NUMBERED.sub(r'.\1', m) for m in modules]
  inverse = {v: k for k, v in (leaves or {}).items()}
  leaf = 'weight' if leaf in ('kernel', 'scale') else inverse.get(leaf, leaf)
  return '.'.join(modules + [leaf])


def torch_to_flax(array: np.ndarray) -> np.ndarray:
  """Conv `[O, I, kh, kw] -> [kh, kw, I, O]`, linear `[O, I] -> [I, O]`, other ranks unchanged."""
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return np.transpose(array)
  return array


def flax_to_torch(array: np.ndarray) -> np.ndarray:
  """The inverse of `torch_to_flax`: conv `[kh, kw, I, O] -> [O, I, kh, kw]`, linear `[I, O] -> [O, I]`."""
  if array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 2:
    return np.transpose(array)
  return array


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a tensor whose Flax shape is `flax_shape` (what an error message shows the user)."""
  shape = tuple(flax_shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape
