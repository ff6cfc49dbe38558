"""Strict import: converted tensors against the parameters a model expects, every problem named in one error.

An importer renames each tensor of a weights file to a parameter path and converts it to the Flax layout
(`layout`); `match_params` then checks the lot against the model's parameter shapes (`expected_shapes`), so that a
file for another architecture, a truncated export or a renamed layer fails with the full list of what is missing,
unexpected, mis-shaped or given twice, rather than at the first lookup or, worse, not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import numpy as np

from lpl_jax.weights.files import is_float
from lpl_jax.weights.layout import Path, path_to_torch_name, torch_shape

Shape = tuple[int, ...]


class WeightsMismatchError(ValueError):
  """A weights file does not hold exactly the tensors of the model it is loaded into."""


def expected_shapes(init: Callable[[], Any]) -> dict[Path, Shape]:
  """`{path: shape}` of the parameter tree `init()` returns, traced with `jax.eval_shape` (nothing is computed)."""
  shapes = jax.eval_shape(init)
  return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


def match_params(
  tensors: Iterable[tuple[str, Path, np.ndarray]],
  expected: Mapping[Path, Shape],
  *,
  target: str,
  model: str = 'model',
  name_of: Callable[[Path], str] = path_to_torch_name,
  file_shape: Callable[[Shape], Shape] = torch_shape,
) -> dict[Path, np.ndarray]:
  """The flat parameters of a converted weights file, checked against the shapes the model expects.

  Args:
    tensors: `(name in the file, parameter path, value in Flax layout)` for each tensor of the file; tensors that
      are not parameters (training counters) are left out by the caller, and a file tensor split into several
      parameters gives one entry per part, each with the file's name.
    expected: `{path: shape}` of the model's parameters, e.g. `expected_shapes(lambda: init_params(model, key))`.
    target: what the weights should match, in the error's first line: `weights do not match {target}:`.
    model: the model's short name in a mis-shaped line: `..., {model} expects (3, 32, 3, 3)`.
    name_of: the file's name of a parameter path, to name missing tensors.
    file_shape: the file's shape of a Flax shape (`torch_shape`), so every shape in the error is the file's.

  Returns:
    `{path: value}` for every path of `expected`, values as given.

  Raises:
    WeightsMismatchError: naming every missing, unexpected, mis-shaped, non-floating-point and doubly given tensor
      at once.
  """
  accepted: dict[Path, np.ndarray] = {}
  origin: dict[Path, str] = {}
  rejected: set[Path] = set()  # present but wrong: not also reported missing
  unexpected, misshaped, not_float, duplicated = [], [], [], []
  for name, path, value in tensors:
    if path not in expected:
      unexpected.append(f'{name} {file_shape(np.shape(value))}')
      continue
    if path in origin:
      duplicated.append(f'{name} (same tensor as {origin[path]})')
      continue
    origin[path] = name
    if tuple(np.shape(value)) != tuple(expected[path]):
      misshaped.append(f'{name}: file has {file_shape(np.shape(value))}, {model} expects {file_shape(expected[path])}')
      rejected.add(path)
    elif not is_float(np.asarray(value).dtype):
      not_float.append(f'{name}: dtype {np.asarray(value).dtype}, expected floating point')
      rejected.add(path)
    else:
      accepted[path] = value
  missing = [f'{name_of(p)} {file_shape(s)}' for p, s in expected.items() if p not in accepted and p not in rejected]
  problems = [
    f'{len(items)} {title} tensor(s):\n    ' + '\n    '.join(sorted(items))
    for title, items in (
      ('missing', missing),
      ('unexpected', unexpected),
      ('mis-shaped', misshaped),
      ('non-floating-point', not_float),
      ('given twice', duplicated),
    )
    if items
  ]
  if problems:
    raise WeightsMismatchError(f'weights do not match {target}:\n  ' + '\n  '.join(problems))
  return accepted
