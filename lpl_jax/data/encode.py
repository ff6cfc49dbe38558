"""A data set encoded once by the autoencoder into a latent cache (the library half of `python -m lpl_jax.encode`).

Images are read in source order (no shuffle), cropped, encoded by a jitted `encode` with the batch sharded over all
local devices, and written with `LatentCacheWriter` (raw posterior means, optionally stds, labels). Cache record `i`
is record `i` of the image pipeline's unshuffled stream with the same crop settings and seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpl_jax.data.cache import LatentCacheWriter
from lpl_jax.data.pipeline import image_stream
from lpl_jax.data.transforms import CropConfig, to_float


def encode_to_cache(
  source: Any,
  model: Any,
  params: Any,
  out: str,
  *,
  resolution: int,
  batch_size: int,
  store_std: bool = False,
  num_samples: int | None = None,
  random_crop: bool = False,
  crop_scale: tuple[float, float] = (0.5, 1.0),
  seed: int = 0,
  dtype: str = 'float32',
  shard_size: int = 4096,
  metadata: dict | None = None,
  overwrite: bool = False,
  progress: bool = True,
) -> str:
  """Encodes the first `num_samples` records of `source` (all if `None`) into a latent cache at `out`.

  Args:
    source: an image source (`lpl_jax.data.sources`).
    model: the autoencoder, an `lpl_jax.autoencoder.AutoencoderKL` (its `config` gives the downsampling factor and
      the latent scaling; `encode` maps `[B, H, W, 3]` images in [-1, 1] to the posterior's mean and log-variance).
    params: the autoencoder's parameters (at least the encoder's).
    out: the cache folder to create.
    resolution: image side; a multiple of the autoencoder's downsampling factor.
    batch_size: images per encoder call; a multiple of the local device count (the batch is sharded over them).
    store_std: also store the posterior std `exp(logvar / 2)` (for `z = mean + std * eps` at training time).
    num_samples: how many records, the first of the source; `None` for all.
    random_crop, crop_scale, seed: cropping (see `make_image_pipeline`); no flips (a flip is a different latent).
    dtype, shard_size: storage (see `LatentCacheWriter`).
    metadata: extra provenance for the index.
    overwrite: replace an existing cache at `out` (it survives if this run fails).
    progress: show a progress bar.

  Returns:
    The cache folder.

  Raises:
    ValueError: more than one process, a resolution or batch size that does not fit, or a `num_samples` the source
      does not have.
  """
  if jax.process_count() > 1:
    raise ValueError(
      "encode runs in one process (it shards the batch over that process's devices); "
      f'this job has {jax.process_count()} processes.'
    )
  f = model.config.downsample_factor
  if resolution % f:
    raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's downsampling factor {f}.")
  devices = jax.local_devices()
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of the {len(devices)} local devices.')
  count = len(source) if num_samples is None else num_samples
  if not 0 < count <= len(source):
    raise ValueError(f'num_samples={num_samples}: the source {source!r} has {len(source)} records.')

  crop = CropConfig(resolution, random_crop=random_crop, crop_scale=tuple(crop_scale))
  stream = image_stream(source, crop, seed=seed, shuffle=False, num_epochs=1)[:count]
  batches = stream.batch(
    batch_size, batch_fn=lambda rs: (np.stack([r['image'] for r in rs]), np.asarray([r['label'] for r in rs], np.int32))
  )
  batches = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))

  mesh = Mesh(np.asarray(devices), ('data',))
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, rows), out_shardings=(rows, rows))
  def encode(params, images):
    mean, logvar = model.apply({'params': params}, images, method=model.encode)
    return mean, jnp.exp(0.5 * logvar)

  cfg = model.config
  meta = dict(autoencoder_config=dataclasses.asdict(cfg), crop=dataclasses.asdict(crop), seed=seed, **(metadata or {}))
  with LatentCacheWriter(
    out,
    resolution=resolution,
    scaling_factor=cfg.scaling_factor,
    shift_factor=cfg.shift_factor,
    store_std=store_std,
    shard_size=shard_size,
    dtype=dtype,
    metadata=meta,
    overwrite=overwrite,
  ) as writer:
    for images, labels in tqdm.tqdm(
      batches, total=math.ceil(count / batch_size), unit='batch', desc='encode', disable=not progress
    ):
      n = len(labels)
      x = to_float(images)
      if n < batch_size:  # the last batch is padded so that one compiled shape serves every call
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
      mean, std = jax.device_get(encode(params, jax.device_put(x, rows)))
      writer.add(mean[:n], labels, std[:n] if store_std else None)
  return writer.path
