"""`python -m lpl_jax.encode`: encodes a data set once with the autoencoder into a latent cache.

Images are read in source order (no shuffle), cropped to `--resolution` (random crops for the embedded
photographs, deterministic in `--seed`; centred otherwise), encoded with the batch sharded over all local devices,
and written as a latent cache (`lpl_jax.data.encode_to_cache`: raw posterior means, optionally stds, labels). Cache
record `i` is record `i` of the image pipeline's unshuffled stream with the same crop settings and seed.

Usage:
  python -m lpl_jax.encode --source=embedded --resolution=256 --autoencoder=/path/to/sdxl-vae --out=cache/embedded
  python -m lpl_jax.encode --source=tfds:imagenet2012 --split=train --data_dir=~/tensorflow_datasets \
      --resolution=256 --autoencoder=/path/to/vae --out=cache/in256 --batch_size=256 --store_std

Bad input (a flag value, a missing folder, a resolution the autoencoder cannot take) ends with one `error: ...`
line on stderr and exit status 2.
"""

from __future__ import annotations

import jax
from absl import app, flags

from lpl_jax import autoencoder as ae
from lpl_jax import data
from lpl_jax.cli import USER_ERRORS, define_verbose_flag, parse_flags_or_exit, run_or_exit

_SOURCE = flags.DEFINE_string('source', 'embedded', 'embedded | folder:PATH | tfds:NAME.')
_SPLIT = flags.DEFINE_string('split', 'train', 'TFDS split (tfds: sources).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (tfds: sources).')
_RESOLUTION = flags.DEFINE_integer('resolution', 256, 'Image side in pixels.')
_AUTOENCODER = flags.DEFINE_string(
  'autoencoder', 'tiny', 'Diffusers autoencoder folder, or a preset name (random weights).'
)
_OUT = flags.DEFINE_string('out', None, 'Cache folder to create.', required=True)
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per encoder call (all local devices together).')
_STORE_STD = flags.DEFINE_bool('store_std', False, 'Also store the posterior std.')
_NUM_SAMPLES = flags.DEFINE_integer(
  'num_samples', None, 'Records to encode: the first N of the source (embedded: its virtual length, default 1024).'
)
_CROP = flags.DEFINE_enum(
  'crop', None, ['center', 'random'], 'Centred or random square crops (default: random for embedded, else center).'
)
_CROP_SCALE = flags.DEFINE_list(
  'crop_scale', ['0.5', '1.0'], 'Random crop side range LOW,HIGH, fractions of the short side.'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random crops (and of random preset weights).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'float16'], 'Storage dtype.')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', 4096, 'Records per .npy shard.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing cache at --out.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar (--noprogress: none).')
_VERBOSE = define_verbose_flag()


@flags.validator('crop_scale', message='--crop_scale takes two numbers, LOW,HIGH (e.g. 0.5,1.0).')
def _is_float_pair(values: list[str]) -> bool:
  # Only the form; the range (0 < LOW <= HIGH <= 1) is CropConfig's to check.
  try:
    return len([float(v) for v in values]) == 2
  except ValueError:
    return False


def encode() -> str:
  embedded = _SOURCE.value == 'embedded'
  source = data.make_source(
    _SOURCE.value, split=_SPLIT.value, data_dir=_DATA_DIR.value, num_samples=_NUM_SAMPLES.value if embedded else None
  )
  model, params, random_weights = ae.load_autoencoder(_AUTOENCODER.value, seed=_SEED.value)
  if random_weights:
    print(
      f'NOTE: autoencoder preset {_AUTOENCODER.value!r} has RANDOM weights (seed {_SEED.value}); these latents '
      'are not those of a trained autoencoder. Pass a diffusers folder for real latents.'
    )
  random_crop = (_CROP.value or ('random' if embedded else 'center')) == 'random'
  devices = jax.local_devices()
  print(
    f'encoding {_NUM_SAMPLES.value or len(source)} records of {source!r} at {_RESOLUTION.value}px '
    f'({"random" if random_crop else "centred"} crops) on {len(devices)} {devices[0].platform} device(s) -> '
    f'{_OUT.value}'
  )
  metadata = dict(
    autoencoder=_AUTOENCODER.value,
    random_weights=random_weights,
    source=_SOURCE.value,
    split=_SPLIT.value,
    num_classes=int(source.num_classes),
  )
  return data.encode_to_cache(
    source,
    model,
    params,
    _OUT.value,
    resolution=_RESOLUTION.value,
    batch_size=_BATCH.value,
    store_std=_STORE_STD.value,
    num_samples=None if embedded else _NUM_SAMPLES.value,
    random_crop=random_crop,
    crop_scale=tuple(float(v) for v in _CROP_SCALE.value),
    seed=_SEED.value,
    dtype=_DTYPE.value,
    shard_size=_SHARD_SIZE.value,
    metadata=metadata,
    overwrite=_OVERWRITE.value,
    progress=_PROGRESS.value,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  # An existing cache without --overwrite is the user's to fix, like a missing folder or a bad resolution.
  path = run_or_exit(encode, USER_ERRORS + (ValueError, FileExistsError), verbose=_VERBOSE.value)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
