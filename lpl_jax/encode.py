"""`python -m lpl_jax.encode`: encodes a data set once with the autoencoder into a latent cache.

Images are read in source order (no shuffle), cropped to `--resolution` (centred; random crops for the embedded
photographs, deterministic in `--seed`), encoded by a jitted `AutoencoderKL.encode` with the batch sharded over all
local devices, and written as a latent cache (`lpl_jax.data.cache`: raw posterior means, optionally stds, labels).
Cache record `i` is record `i` of the image pipeline's unshuffled stream with the same crop settings and seed.

Usage:
  python -m lpl_jax.encode --source=embedded --resolution=256 --autoencoder=/path/to/sdxl-vae --out=cache/embedded
  python -m lpl_jax.encode --source=tfds:imagenet2012 --split=train --data_dir=~/tensorflow_datasets \
      --resolution=256 --autoencoder=/path/to/vae --out=cache/in256 --batch_size=256 --store_std
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpl_jax import autoencoder as ae
from lpl_jax.data.cache import LatentCacheWriter
from lpl_jax.data.pipeline import image_stream
from lpl_jax.data.sources import make_source
from lpl_jax.data.transforms import CropConfig, to_float


def load_autoencoder(spec: str, *, seed: int = 0) -> tuple[ae.AutoencoderKL, Any, bool]:
  """`(model, params, random_weights)` from a diffusers folder or a preset name.

  A preset gets random encoder parameters from `seed` (only the encoder and `quant_conv`: flax derives each module's
  initialisation from its path, so these equal the encoder part of `init_params(model, key)`, and skipping the
  decoder halves the start-up compilation).
  """
  if os.path.isdir(spec):
    model, params = ae.from_diffusers(spec)
    return model, params, False
  if spec in ae.PRESETS:
    model = ae.from_preset(spec)
    x = jnp.zeros((1, 2 * model.config.downsample_factor, 2 * model.config.downsample_factor,
                   model.config.in_channels), jnp.float32)
    init = jax.jit(lambda key: model.init(key, x, method=model.encode)['params'])
    return model, init(jax.random.key(seed)), True
  raise ValueError(f'--autoencoder={spec!r} is neither a diffusers autoencoder folder nor a preset '
                   f'({sorted(ae.PRESETS)}).')


def encode_to_cache(source: Any, model: ae.AutoencoderKL, params: Any, out: str, *, resolution: int,
                    batch_size: int, store_std: bool = False, num_samples: int | None = None,
                    random_crop: bool = False, crop_scale: tuple[float, float] = (0.5, 1.0), seed: int = 0,
                    dtype: str = 'float32', shard_size: int = 4096, metadata: dict | None = None,
                    overwrite: bool = False, progress: bool = True) -> str:
  """Encodes the first `num_samples` records of `source` (all if `None`) into a latent cache at `out`.

  Args:
    source: an image source (`lpl_jax.data.sources`).
    model, params: the autoencoder.
    resolution: image side; a multiple of the autoencoder's downsampling factor.
    batch_size: images per encoder call; a multiple of the local device count (the batch is sharded over them).
    store_std: also store the posterior std `exp(logvar / 2)` (for `z = mean + std * eps` at training time).
    random_crop, crop_scale, seed: cropping (see `make_image_pipeline`); no flips (a flip is a different latent).
    dtype, shard_size: storage (see `LatentCacheWriter`).
    metadata: extra provenance for the index.

  Returns:
    The cache folder.
  """
  if jax.process_count() > 1:
    raise ValueError('encode runs in one process (it shards the batch over that process\'s devices); '
                     f'this job has {jax.process_count()} processes.')
  f = model.config.downsample_factor
  if resolution % f:
    raise ValueError(f'resolution {resolution} is not a multiple of the autoencoder\'s downsampling factor {f}.')
  devices = jax.local_devices()
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of the {len(devices)} local devices.')
  count = len(source) if num_samples is None else num_samples
  if not 0 < count <= len(source):
    raise ValueError(f'num_samples={num_samples}: the source {source!r} has {len(source)} records.')

  crop = CropConfig(resolution, random_crop=random_crop, crop_scale=tuple(crop_scale))
  stream = image_stream(source, crop, seed=seed, shuffle=False, num_epochs=1)[:count]
  batches = stream.batch(batch_size, batch_fn=lambda rs: (np.stack([r['image'] for r in rs]),
                                                          np.asarray([r['label'] for r in rs], np.int32)))
  batches = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))

  mesh = Mesh(np.asarray(devices), ('data',))
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, rows), out_shardings=(rows, rows))
  def encode(params, images):
    mean, logvar = model.apply({'params': params}, images, method=model.encode)
    return mean, jnp.exp(0.5 * logvar)

  cfg = model.config
  meta = dict(autoencoder_config=dataclasses.asdict(cfg), crop=dataclasses.asdict(crop), seed=seed,
              **(metadata or {}))
  with LatentCacheWriter(out, resolution=resolution, scaling_factor=cfg.scaling_factor,
                         shift_factor=cfg.shift_factor, store_std=store_std, shard_size=shard_size, dtype=dtype,
                         metadata=meta, overwrite=overwrite) as writer:
    for images, labels in tqdm.tqdm(batches, total=math.ceil(count / batch_size), unit='batch', desc='encode',
                                    disable=not progress):
      n = len(labels)
      x = to_float(images)
      if n < batch_size:  # the last batch is padded so that one compiled shape serves every call
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
      mean, std = jax.device_get(encode(params, jax.device_put(x, rows)))
      writer.add(mean[:n], labels, std[:n] if store_std else None)
  return writer.path


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--source', default='embedded', help='embedded | folder:PATH | tfds:NAME')
  parser.add_argument('--split', default='train', help='TFDS split (tfds: sources)')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (tfds: sources)')
  parser.add_argument('--resolution', type=int, default=256, help='image side in pixels')
  parser.add_argument('--autoencoder', default='tiny', help='diffusers autoencoder folder, or a preset name '
                      '(random weights)')
  parser.add_argument('--out', required=True, help='cache folder to create')
  parser.add_argument('--batch_size', type=int, default=32, help='images per encoder call (all local devices)')
  parser.add_argument('--store_std', action='store_true', help='also store the posterior std')
  parser.add_argument('--num_samples', type=int, default=None,
                      help='records to encode: the first N of the source (embedded: its virtual length, default '
                      '1024)')
  parser.add_argument('--crop', choices=('center', 'random'), default=None,
                      help='centred or random square crops (default: random for embedded, else center)')
  parser.add_argument('--crop_scale', type=float, nargs=2, default=(0.5, 1.0),
                      help='random crop side range, fractions of the short side')
  parser.add_argument('--seed', type=int, default=0, help='seed of the random crops (and of random preset weights)')
  parser.add_argument('--dtype', choices=('float32', 'float16'), default='float32', help='storage dtype')
  parser.add_argument('--shard_size', type=int, default=4096, help='records per .npy shard')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing cache at --out')
  parser.add_argument('--no_progress', action='store_true', help='no progress bar')
  args = parser.parse_args(argv)

  embedded = args.source == 'embedded'
  source = make_source(args.source, split=args.split, data_dir=args.data_dir,
                       num_samples=args.num_samples if embedded else None)
  model, params, random_weights = load_autoencoder(args.autoencoder, seed=args.seed)
  if random_weights:
    print(f'NOTE: autoencoder preset {args.autoencoder!r} has RANDOM weights (seed {args.seed}); these latents are '
          'not those of a trained autoencoder. Pass a diffusers folder for real latents.')
  random_crop = (args.crop or ('random' if embedded else 'center')) == 'random'
  print(f'encoding {args.num_samples or len(source)} records of {source!r} at {args.resolution}px '
        f'({"random" if random_crop else "centred"} crops) on {len(jax.local_devices())} '
        f'{jax.local_devices()[0].platform} device(s) -> {args.out}')
  metadata = dict(autoencoder=args.autoencoder, random_weights=random_weights, source=args.source, split=args.split,
                  num_classes=int(source.num_classes))
  path = encode_to_cache(source, model, params, args.out, resolution=args.resolution, batch_size=args.batch_size,
                         store_std=args.store_std, num_samples=None if embedded else args.num_samples,
                         random_crop=random_crop, crop_scale=tuple(args.crop_scale), seed=args.seed,
                         dtype=args.dtype, shard_size=args.shard_size, metadata=metadata, overwrite=args.overwrite,
                         progress=not args.no_progress)
  print(f'wrote {path}')
  return path


if __name__ == '__main__':
  main(sys.argv[1:])
