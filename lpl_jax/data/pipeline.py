"""grain pipelines: seed-determined order, per-record random crops/flips, per-process shares of each global batch.

The pipeline is a `grain.MapDataset` chain, so every element is a pure function of `(seed, position)`:

  source -> shuffle (per epoch, from the seed) -> repeat(num_epochs) -> per-record transform (random map keyed by
  the record's position in the global stream) -> this process's rows of each global batch -> batch -> prefetch.

Global batch `s` is stream positions `[s * B, (s + 1) * B)`, and process `p` of `P` takes the contiguous rows
`[p * B / P, (p + 1) * B / P)` of it, so the concatenation of all processes' batches at step `s` is the same for any
process count. A partial last global batch is dropped. The iterator's state is `{'next_index': s}`: a step counter,
JSON-serialisable, identical on every process (with `worker_count > 0`, grain's per-worker positions instead, to be
restored with the same `worker_count`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from lpl_jax.data.transforms import CropConfig, crop_resize_flip, to_float


class ProcessShareMapDataset(grain.MapDataset):
  """Element `s * L + r` is element `s * B + p * L + r` of the parent (`B` the global batch, `L = B / P`)."""

  def __init__(self, parent: grain.MapDataset, *, global_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._global, self._local = global_batch, global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    n = len(self._parent)
    return sys.maxsize if n >= sys.maxsize else (n // self._global) * self._local

  def _parent_index(self, index: int) -> int:
    step, row = divmod(index, self._local)
    return step * self._global + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._parent_index(i) for i in indices])

  def __str__(self) -> str:
    return f'ProcessShareMapDataset(global_batch={self._global}, rows={self._offset}:{self._offset + self._local})'


def _seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the random map (grain's shuffle uses `seed + epoch`, so seeds
  that are consecutive integers would share epochs)."""
  shuffle_seed, map_seed = np.random.SeedSequence(int(seed)).generate_state(2)
  return int(shuffle_seed), int(map_seed)


def _process_share(process_index: int | None, process_count: int | None, global_batch: int) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count}).')
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(
      f'global batch {global_batch} is not divisible by the process count {process_count}: each '
      'process must load the same number of rows.'
    )
  return process_index, process_count


def _stream(source: Any, *, seed: int, shuffle: bool, num_epochs: int | None, global_batch: int) -> grain.MapDataset:
  if len(source) == 0:
    raise ValueError(f'the data source {source!r} is empty.')
  if num_epochs is not None and num_epochs * len(source) < global_batch:
    raise ValueError(f'{num_epochs} epoch(s) of {len(source)} records make no complete global batch of {global_batch}.')
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=_seeds(seed)[0])
  return ds.repeat(num_epochs)


def _finish(
  ds: grain.MapDataset,
  *,
  global_batch: int,
  process_index: int | None,
  process_count: int | None,
  batch_fn: Callable[[Sequence[dict]], dict],
  worker_count: int,
  read_threads: int,
  prefetch: int,
) -> grain.IterDataset:
  process_index, process_count = _process_share(process_index, process_count, global_batch)
  ds = ProcessShareMapDataset(ds, global_batch=global_batch, process_index=process_index, process_count=process_count)
  ds = ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=batch_fn)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    # grain's worker processes read absl flags (their defaults are fine); outside `absl.app.run` nobody parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch))
  return it


def image_stream(
  source: Any, crop: CropConfig, *, seed: int, shuffle: bool, num_epochs: int | None = None, global_batch: int = 1
) -> grain.MapDataset:
  """The global stream of cropped uint8 records `{'image': [R, R, 3], 'label': []}` (no batching, no sharding).

  `encode_to_cache` reads it with `shuffle=False, num_epochs=1`, so cache record `i` is stream position `i`.
  """
  ds = _stream(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, global_batch=global_batch)

  def transform(record: dict, rng: np.random.Generator | None = None) -> dict:
    return {'image': crop_resize_flip(record['image'], crop, rng), 'label': np.int32(record['label'])}

  if crop.is_random:
    return ds.random_map(transform, seed=_seeds(seed)[1])
  return ds.map(transform)


def _batch_images(records: Sequence[dict]) -> dict[str, np.ndarray]:
  return {
    'images': to_float(np.stack([r['image'] for r in records])),
    'labels': np.asarray([r['label'] for r in records], np.int32),
  }


def make_image_pipeline(
  source: Any,
  *,
  resolution: int,
  global_batch: int,
  seed: int,
  shuffle: bool = True,
  random_flip: bool = False,
  random_crop: bool = False,
  crop_scale: tuple[float, float] = (0.5, 1.0),
  num_epochs: int | None = None,
  worker_count: int = 0,
  read_threads: int = 2,
  prefetch: int = 4,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """Batches of images for this process.

  Args:
    source: an image source (`lpl_jax.data.sources`), records `{'image': uint8 [H, W, 3], 'label': int}`.
    resolution: side of the square output images.
    global_batch: rows per step over all processes; must be divisible by `process_count`.
    seed: determines the order (if `shuffle`) and the random crops and flips.
    shuffle: shuffle each epoch (differently per epoch); otherwise source order.
    random_flip: horizontal flip with probability 1/2.
    random_crop: square crop of side `uniform(*crop_scale) * short side` at a uniform position; otherwise the
      centred square of the short side.
    crop_scale: see `random_crop`.
    num_epochs: `None` repeats forever.
    worker_count: grain worker processes (0: batches are made in this process by `read_threads` threads).
    read_threads: threads making batches (per worker process).
    prefetch: batches buffered ahead (per worker process).
    process_index, process_count: this process's place; default `jax.process_index()` / `jax.process_count()`.

  Returns:
    A `grain.IterDataset`; `iter(...)` gives batches `{'images': float32 [L, R, R, 3] in [-1, 1], 'labels': int32
    [L]}` with `L = global_batch // process_count`, and the iterator has `get_state()` / `set_state()`.
  """
  crop = CropConfig(resolution, random_crop=random_crop, crop_scale=tuple(crop_scale), random_flip=random_flip)
  _process_share(process_index, process_count, global_batch)  # fail before touching the source
  ds = image_stream(source, crop, seed=seed, shuffle=shuffle, num_epochs=num_epochs, global_batch=global_batch)
  return _finish(
    ds,
    global_batch=global_batch,
    process_index=process_index,
    process_count=process_count,
    batch_fn=_batch_images,
    worker_count=worker_count,
    read_threads=read_threads,
    prefetch=prefetch,
  )


def make_latent_pipeline(
  source: Any,
  *,
  global_batch: int,
  seed: int,
  shuffle: bool = True,
  sample_posterior: bool = True,
  resolution: int | None = None,
  num_epochs: int | None = None,
  worker_count: int = 0,
  read_threads: int = 2,
  prefetch: int = 4,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """Batches of cached (scaled) latents for this process; the same order, sharding and state as the image pipeline.

  Args:
    source: a `LatentCacheSource`, records `{'latent', 'label'}` (+ `'latent_std'`, `'text'` when cached).
    sample_posterior: where the cache holds the posterior std, each record becomes `latent + std * eps`,
      `eps ~ N(0, I)` drawn from the record's own rng (deterministic in the seed and stream position); otherwise
      (or without std) the posterior mean.
    resolution: if given, the image resolution the cache must have been encoded at.
    Other arguments: as `make_image_pipeline`.

  Returns:
    A `grain.IterDataset` of `{'latents': float32 [L, h, w, C], 'labels': int32 [L]}` (+ `'text'` `[L, ...]`).
  """
  if resolution is not None and resolution != source.resolution:
    raise ValueError(
      f'the latent cache {source.path!r} was encoded at resolution {source.resolution}, the pipeline '
      f'asks for {resolution}: re-encode with `python -m lpl_jax.encode --resolution={resolution}`.'
    )
  _process_share(process_index, process_count, global_batch)
  ds = _stream(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, global_batch=global_batch)

  def keep(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != 'latent_std'}

  def sample(record: dict, rng: np.random.Generator) -> dict:
    eps = rng.standard_normal(record['latent'].shape, dtype=np.float32)
    return dict(keep(record), latent=record['latent'] + record['latent_std'] * eps)

  ds = ds.random_map(sample, seed=_seeds(seed)[1]) if sample_posterior and source.has_std else ds.map(keep)

  def batch_fn(records: Sequence[dict]) -> dict[str, np.ndarray]:
    out = {
      'latents': np.stack([r['latent'] for r in records]).astype(np.float32),
      'labels': np.asarray([r['label'] for r in records], np.int32),
    }
    if 'text' in records[0]:
      out['text'] = np.stack([r['text'] for r in records])
    return out

  return _finish(
    ds,
    global_batch=global_batch,
    process_index=process_index,
    process_count=process_count,
    batch_fn=batch_fn,
    worker_count=worker_count,
    read_threads=read_threads,
    prefetch=prefetch,
  )


def make_pipeline(
  source: Any,
  *,
  resolution: int,
  global_batch: int,
  seed: int,
  shuffle: bool = True,
  random_flip: bool = False,
  random_crop: bool = False,
  crop_scale: tuple[float, float] = (0.5, 1.0),
  sample_posterior: bool = True,
  num_epochs: int | None = None,
  worker_count: int = 0,
  read_threads: int = 2,
  prefetch: int = 4,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """The training pipeline for any source: `make_latent_pipeline` for a latent cache (which must have been encoded
  at `resolution`; crops and flips are refused, they would need re-encoding), `make_image_pipeline` otherwise
  (`sample_posterior` is ignored)."""
  common = dict(
    global_batch=global_batch,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    worker_count=worker_count,
    read_threads=read_threads,
    prefetch=prefetch,
    process_index=process_index,
    process_count=process_count,
  )
  if hasattr(source, 'latent_shape'):
    if random_flip or random_crop:
      raise ValueError(
        f'random_flip={random_flip}, random_crop={random_crop}: a latent cache holds fixed crops; '
        'augment when encoding (`python -m lpl_jax.encode --crop=random`) or train on images.'
      )
    return make_latent_pipeline(source, sample_posterior=sample_posterior, resolution=resolution, **common)
  return make_image_pipeline(
    source, resolution=resolution, random_flip=random_flip, random_crop=random_crop, crop_scale=crop_scale, **common
  )


def steps_per_epoch(source: Any, global_batch: int) -> int:
  """Complete global batches in one pass over `source` (epochs are not aligned to batches: a batch may straddle
  two epochs)."""
  return len(source) // global_batch


def iterator_state_to_bytes(state: dict[str, Any]) -> bytes:
  """`iterator.get_state()` -> bytes to store next to a checkpoint (JSON; grain's own orbax handler,
  `grain.checkpoint.CheckpointSave(iterator)`, writes the same JSON)."""
  return json.dumps(state, sort_keys=True).encode()


def iterator_state_from_bytes(data: bytes) -> dict[str, Any]:
  """Inverse of `iterator_state_to_bytes`; pass the result to `iterator.set_state`."""
  return json.loads(data.decode() if isinstance(data, bytes | bytearray) else data)
