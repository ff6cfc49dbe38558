"""Batched feature extraction over a device mesh: images in, `[N, D]` float32 features out, in input order.

Every batch has the same shape (the last one is padded by repeating its final image, and the padding dropped), so
`apply_fn` compiles once. With several devices the batch axis is split over a 1-D mesh (`batch_size` must divide by
its size); the network's parameters are replicated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lpl_jax.eval.batches import check_images, load_npz_images

BATCH_AXIS = 'batch'


def _fixed_batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Re-chunks an array or an iterable of `[b, H, W, 3]` arrays into `(batch [batch_size, ...], num_valid)`."""
  if isinstance(images, np.ndarray):
    array = images
    images = (array[i : i + batch_size] for i in range(0, array.shape[0], batch_size))
  pending: list[np.ndarray] = []
  count = 0
  for chunk in images:
    chunk = check_images(chunk, 'a batch of images')
    pending.append(chunk)
    count += chunk.shape[0]
    while count >= batch_size:
      joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
      yield joined[:batch_size], batch_size
      pending, count = ([joined[batch_size:]], count - batch_size) if count > batch_size else ([], 0)
  if count:
    joined = np.concatenate(pending)
    pad = np.repeat(joined[-1:], batch_size - count, axis=0)
    yield np.concatenate([joined, pad]), count


def default_mesh() -> Mesh | None:
  """A 1-D mesh over every device when there are several, else None (plain single-device execution)."""
  devices = jax.devices()
  return Mesh(np.asarray(devices), (BATCH_AXIS,)) if len(devices) > 1 else None


def extract_features(
  images: np.ndarray | Iterable[np.ndarray] | str | os.PathLike,
  apply_fn: Callable[..., jax.Array],
  batch_size: int,
  mesh: Mesh | None = None,
  *,
  params: Any = None,
  progress: bool = True,
  desc: str = 'features',
) -> np.ndarray:
  """Features of every image, computed in fixed-size batches (sharded over `mesh`'s first axis if given).

  Args:
    images: uint8 `[N, H, W, 3]`; an iterable of such batches (any sizes); or the path of an ADM-layout `.npz`.
    apply_fn: `apply_fn(params, batch)` (or `apply_fn(batch)` when `params` is None) -> `[batch_size, D]`; jitted
      here with the batch sharded over the mesh.
    batch_size: images per step (global, over all devices); must divide by the mesh's first axis size.
    mesh: device mesh; by default one over all devices when there are several (see `default_mesh`).
    params: the frozen network's parameters, passed as an argument (replicated), not closed over.
    progress: show a tqdm progress bar.
    desc: the progress bar's label.

  Returns:
    `[N, D]` float32 features, in the order of the input.
  """
  if isinstance(images, (str, os.PathLike)):
    images = load_npz_images(images)
  if isinstance(images, np.ndarray):
    check_images(images)
  mesh = default_mesh() if mesh is None else mesh
  if mesh is not None:
    data_size = mesh.devices.shape[0]
    if batch_size % data_size:
      raise ValueError(
        f"batch_size={batch_size} must be a multiple of the mesh's {mesh.axis_names[0]!r} axis size ({data_size})."
      )
    data = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    replicated = NamedSharding(mesh, PartitionSpec())
  else:
    data = replicated = None
  fn = apply_fn if params is not None else (lambda _, x: apply_fn(x))
  if mesh is None:
    step = jax.jit(fn)
  else:
    step = jax.jit(fn, in_shardings=(replicated, data), out_shardings=data)
    params = jax.device_put(params, replicated)
  total = images.shape[0] if isinstance(images, np.ndarray) else None
  outputs, in_flight = [], None
  with tqdm.tqdm(total=total, desc=desc, unit='img', disable=not progress) as bar:
    for batch, valid in _fixed_batches(images, batch_size):
      batch = jax.device_put(batch, data) if data is not None else batch
      result = step(params, batch)  # dispatched asynchronously: the previous batch is fetched while this one runs
      if in_flight is not None:
        outputs.append(np.asarray(in_flight[0], np.float32)[: in_flight[1]])
        bar.update(in_flight[1])
      in_flight = (result, valid)
    if in_flight is not None:
      outputs.append(np.asarray(in_flight[0], np.float32)[: in_flight[1]])
      bar.update(in_flight[1])
  if not outputs:
    raise ValueError('no images to extract features from.')
  return np.concatenate(outputs)
