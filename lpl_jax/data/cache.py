"""Latent cache: a data set encoded once by the autoencoder, read back as scaled latents.

On disk (one folder, written under a temporary name and renamed, so a reader never sees a partial cache):

  index.json                       format, count, shard layout, shapes, dtype, resolution, autoencoder config,
                                   scaling_factor / shift_factor, whether std and text are stored, provenance
  labels.npy                       int32 [count]
  mean-00000.npy ...               RAW posterior means [n_shard, h, w, C] (as `AutoencoderKL.encode` returns them)
  std-00000.npy ...                RAW posterior stds `exp(logvar / 2)` (only with store_std)
  text-00000.npy ...               text embeddings [n_shard, ...] (only if given to the writer)

Stored latents are raw, so the cache does not go stale if a scaling factor is revised: `LatentCacheSource` applies
`AutoencoderKL.scale_latents` on read, `latent = (mean - shift_factor) * scaling_factor`, and scales the std by
`|scaling_factor|`, so that `latent + latent_std * eps` is the scaled posterior sample.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from lpl_jax.data.errors import DataError

FORMAT = 'lpl_jax.latent_cache'
VERSION = 1
INDEX_NAME = 'index.json'
LABELS_NAME = 'labels.npy'
_DTYPES = ('float32', 'float16')


def _shard_name(kind: str, shard: int) -> str:
  return f'{kind}-{shard:05d}.npy'


class LatentCacheWriter:
  """Writes a latent cache; use as a context manager (committed on success, discarded on an exception).

  Args:
    path: the cache folder to create (must not exist unless `overwrite`).
    resolution: image resolution the latents were encoded at.
    scaling_factor, shift_factor: the autoencoder's latent scaling (`AutoencoderKL.scale_latents`).
    store_std: whether `add` receives (and the cache keeps) the posterior std.
    shard_size: records per `.npy` shard.
    dtype: storage dtype of latents and stds, `'float32'` or `'float16'`.
    metadata: extra JSON-serialisable provenance stored in the index (autoencoder config, source, crop, seed).
    overwrite: replace an existing cache at `path` (only at commit, so a failed run leaves the old one intact).
  """

  def __init__(
    self,
    path: str | os.PathLike,
    *,
    resolution: int,
    scaling_factor: float,
    shift_factor: float = 0.0,
    store_std: bool = False,
    shard_size: int = 4096,
    dtype: str = 'float32',
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
  ):
    self.path = os.path.abspath(os.fspath(path))
    if os.path.exists(self.path) and not overwrite:
      raise FileExistsError(f'latent cache {self.path!r} already exists (pass overwrite=True / --overwrite).')
    if dtype not in _DTYPES:
      raise ValueError(f'cache dtype {dtype!r} is not supported; use one of {_DTYPES}.')
    if shard_size < 1:
      raise ValueError(f'shard_size must be >= 1, got {shard_size}.')
    self.overwrite, self.shard_size, self.dtype, self.store_std = overwrite, int(shard_size), dtype, store_std
    self._index: dict[str, Any] = dict(
      format=FORMAT,
      version=VERSION,
      count=0,
      shard_size=self.shard_size,
      num_shards=0,
      dtype=dtype,
      latent_shape=None,
      store_std=bool(store_std),
      text_shape=None,
      text_dtype=None,
      resolution=int(resolution),
      latents='raw',
      scaling_factor=float(scaling_factor),
      shift_factor=float(shift_factor),
      metadata=dict(metadata or {}),
    )
    self._tmp = f'{self.path}.tmp-{uuid.uuid4().hex[:8]}'
    os.makedirs(self._tmp)
    self._pending: dict[str, list[np.ndarray]] = {'mean': [], 'std': [], 'text': []}
    self._labels: list[np.ndarray] = []
    self._has_text: bool | None = None

  def add(
    self, mean: np.ndarray, labels: np.ndarray, std: np.ndarray | None = None, text: np.ndarray | None = None
  ) -> None:
    """Appends a batch: raw `mean [n, h, w, C]`, `labels [n]`, raw `std [n, h, w, C]` (iff `store_std`), optional
    `text [n, ...]` (all batches or none)."""
    mean, labels = np.asarray(mean), np.asarray(labels)
    n = mean.shape[0]
    if mean.ndim != 4 or labels.shape != (n,):
      raise ValueError(f'add expects mean [n, h, w, C] and labels [n]; got {mean.shape} and {labels.shape}.')
    if self._index['latent_shape'] is None:
      self._index['latent_shape'] = list(mean.shape[1:])
    elif list(mean.shape[1:]) != self._index['latent_shape']:
      raise ValueError(f'latents {mean.shape[1:]} differ from the earlier {tuple(self._index["latent_shape"])}.')
    if (std is not None) != self.store_std:
      raise ValueError(f'the cache was opened with store_std={self.store_std} but add got std={std is not None}.')
    if std is not None and np.shape(std) != mean.shape:
      raise ValueError(f'std {np.shape(std)} must match mean {mean.shape}.')
    if self._has_text is None:
      self._has_text = text is not None
      if text is not None:
        self._index['text_shape'], self._index['text_dtype'] = list(np.shape(text)[1:]), str(np.asarray(text).dtype)
    if (text is not None) != self._has_text or (
      text is not None and (list(np.shape(text)) != [n] + self._index['text_shape'])
    ):
      raise ValueError(
        'text embeddings must come with every batch (or none), each [n] + '
        f'{self._index["text_shape"]}; got {None if text is None else np.shape(text)}.'
      )
    self._pending['mean'].append(mean.astype(self.dtype))
    if std is not None:
      self._pending['std'].append(np.asarray(std).astype(self.dtype))
    if text is not None:
      self._pending['text'].append(np.asarray(text))
    self._labels.append(labels.astype(np.int32))
    self._index['count'] += n
    while sum(len(m) for m in self._pending['mean']) >= self.shard_size:
      self._flush(self.shard_size)

  def _flush(self, n: int) -> None:
    shard = self._index['num_shards']
    for kind, parts in self._pending.items():
      if not parts:
        continue
      rows = np.concatenate(parts)
      np.save(os.path.join(self._tmp, _shard_name(kind, shard)), rows[:n])
      self._pending[kind] = [rows[n:]] if len(rows) > n else []
    self._index['num_shards'] += 1

  def commit(self) -> str:
    """Writes the last shard and the index, then moves the folder into place; returns its path."""
    if self._index['count'] == 0:
      raise ValueError('refusing to write an empty latent cache (no batch was added).')
    while self._pending['mean']:
      self._flush(self.shard_size)
    np.save(os.path.join(self._tmp, LABELS_NAME), np.concatenate(self._labels))
    with open(os.path.join(self._tmp, INDEX_NAME), 'w') as f:
      json.dump(self._index, f, indent=2)
    old = None
    if os.path.exists(self.path):
      if not self.overwrite:
        raise FileExistsError(
          f'latent cache {self.path!r} appeared while writing; the new one is left at {self._tmp!r}.'
        )
      old = f'{self.path}.old-{uuid.uuid4().hex[:8]}'
      os.rename(self.path, old)
    os.rename(self._tmp, self.path)
    if old:
      shutil.rmtree(old)
    return self.path

  def abort(self) -> None:
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self) -> LatentCacheWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.abort()


def read_index(path: str | os.PathLike) -> dict[str, Any]:
  """The `index.json` of a latent cache, checked."""
  path = os.fspath(path)
  file = os.path.join(path, INDEX_NAME)
  if not os.path.isfile(file):
    what = 'does not exist' if not os.path.exists(path) else f'has no {INDEX_NAME}'
    raise FileNotFoundError(f'latent cache {path!r} {what}; write one with `python -m lpl_jax.encode --out={path}`.')
  with open(file) as f:
    index = json.load(f)
  if index.get('format') != FORMAT or index.get('version') != VERSION:
    raise DataError(
      f'{file!r} is not a version-{VERSION} {FORMAT} index (format={index.get("format")!r}, '
      f'version={index.get("version")!r}).'
    )
  return index


def _check_npy(file: str, what: str, dtype: str, shape: tuple[int, ...]) -> None:
  """Raises `DataError` unless the .npy header of `file` (the cache's `what`) says `dtype` and `shape` and the file
  size fits the header; reads only the header."""
  name, hint = f'latent cache {what} {file!r}', 're-encode or re-copy the cache.'
  with open(file, 'rb') as f:
    try:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        found_shape, _, found_dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        found_shape, _, found_dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f'unsupported .npy format version {version}')
    except (ValueError, SyntaxError, EOFError) as e:
      raise DataError(f'{name} is not a .npy file ({e}); {hint}') from e
    offset, size = f.tell(), os.fstat(f.fileno()).st_size
  found = f'{found_dtype} {tuple(found_shape)}'
  if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype):
    raise DataError(
      f'{name} holds {found} but the index says {np.dtype(dtype)} {tuple(shape)}: it does not match the cache; {hint}'
    )
  needed = offset + int(np.prod(found_shape, dtype=np.int64)) * found_dtype.itemsize
  if size != needed:
    why = 'the file is truncated or was copied incompletely' if size < needed else 'the file has trailing bytes'
    raise DataError(f'{name} holds {size} bytes but its header ({found}) needs {needed}: {why}; {hint}')


class LatentCacheSource:
  """Records `{'latent': float32 [h, w, C], 'label': int32}` (+ `'latent_std'`, `'text'`) of a latent cache.

  `latent` is the scaled posterior mean `(mean - shift_factor) * scaling_factor`, `latent_std` the scaled std; the
  arrays are memory-mapped on first access (per process: the pickled source carries only the path). Opening checks
  every file's .npy header and size against the index (no data is read) and raises `DataError` on a mismatch.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.index = read_index(self.path)
    missing = [name for name in self._shard_files() if not os.path.isfile(os.path.join(self.path, name))]
    if missing:
      raise FileNotFoundError(f'latent cache {self.path!r} is missing shard files {missing[:4]}.')
    self._check_files()
    self._labels = np.load(os.path.join(self.path, LABELS_NAME))
    self._arrays: dict[str, list[np.ndarray]] | None = None

  def _check_files(self) -> None:
    """Checks every shard's (and the labels') .npy header and file size against the index; reads no data."""
    index = self.index
    count, shard_size, num_shards = index['count'], index['shard_size'], index['num_shards']
    if num_shards != -(-count // shard_size):
      raise DataError(
        f'{os.path.join(self.path, INDEX_NAME)!r} is inconsistent: {count} records in shards of {shard_size} need '
        f'{-(-count // shard_size)} shards, it says {num_shards}; re-encode the cache.'
      )
    labels = os.path.join(self.path, LABELS_NAME)
    if not os.path.isfile(labels):
      raise FileNotFoundError(f'latent cache {self.path!r} is missing {LABELS_NAME!r}.')
    _check_npy(labels, 'labels', 'int32', (count,))
    for kind in self._kinds():
      dtype = index['text_dtype'] if kind == 'text' else index['dtype']
      shape = index['text_shape'] if kind == 'text' else index['latent_shape']
      for shard in range(num_shards):
        rows = shard_size if shard < num_shards - 1 else count - shard_size * (num_shards - 1)
        _check_npy(os.path.join(self.path, _shard_name(kind, shard)), 'shard', dtype, (rows, *shape))

  def _kinds(self) -> list[str]:
    return ['mean'] + ['std'] * self.has_std + ['text'] * self.has_text

  def _shard_files(self) -> list[str]:
    return [_shard_name(k, s) for k in self._kinds() for s in range(self.index['num_shards'])]

  def _open(self) -> dict[str, list[np.ndarray]]:
    if self._arrays is None:
      self._arrays = {
        k: [np.load(os.path.join(self.path, _shard_name(k, s)), mmap_mode='r') for s in range(self.index['num_shards'])]
        for k in self._kinds()
      }
    return self._arrays

  def __getstate__(self) -> dict[str, Any]:
    return dict(self.__dict__, _arrays=None)

  @property
  def resolution(self) -> int:
    return self.index['resolution']

  @property
  def has_std(self) -> bool:
    return self.index['store_std']

  @property
  def has_text(self) -> bool:
    return self.index['text_shape'] is not None

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return tuple(self.index['latent_shape'])

  @property
  def scaling_factor(self) -> float:
    return self.index['scaling_factor']

  @property
  def shift_factor(self) -> float:
    return self.index['shift_factor']

  @property
  def num_classes(self) -> int:
    return int(self.index['metadata'].get('num_classes', int(self._labels.max()) + 1))

  def __len__(self) -> int:
    return self.index['count']

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    arrays = self._open()
    shard, row = divmod(int(index), self.index['shard_size'])
    mean = np.asarray(arrays['mean'][shard][row], np.float32)
    record = {
      'latent': (mean - np.float32(self.shift_factor)) * np.float32(self.scaling_factor),
      'label': self._labels[index],
    }
    if self.has_std:
      record['latent_std'] = np.asarray(arrays['std'][shard][row], np.float32) * np.float32(abs(self.scaling_factor))
    if self.has_text:
      record['text'] = np.asarray(arrays['text'][shard][row])
    return record

  def __repr__(self) -> str:
    return f'LatentCacheSource({self.path!r}, {len(self)} x {self.latent_shape}, resolution {self.resolution})'
