"""`python -m lpl_jax.train_autoencoder`: trains a KL autoencoder on the embedded photographs (LDM's recipe) and
exports it as a diffusers-format folder, with the latent `scaling_factor` measured on the data.

  python -m lpl_jax.train_autoencoder --workdir=runs/ae   # configs/autoencoder.py; resumes from runs/ae's checkpoints
  python -m lpl_jax.train_autoencoder --config=configs/autoencoder.py:f4 --cache=runs/ae_cache --config.steps=600
  python -m lpl_jax.train_autoencoder --config=configs/autoencoder.py:f4,gan --workdir=runs/ae_gan

`--workdir` trains there and prints a JSON summary (step, scaling factor, held-out PSNR, training seconds); `--cache`
trains into `<cache>/ae-<settings hash>/` unless that already holds the finished export, and prints the export
folder. The export (`<workdir>/export/`, or `--export`) loads with `lpl_jax.autoencoder.from_diffusers` and with
diffusers' `AutoencoderKL.from_pretrained`. See docs/autoencoder_training.md.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags
from ml_collections import config_flags

from lpl_jax.cli import USER_ERRORS, define_verbose_flag, flags_parser, run_or_exit, setup_logging
from lpl_jax.train.autoencoder import AETrainConfig, ensure_autoencoder, train

# The repository's recipe, wherever the command runs from. It is put on the command line by the flags parser instead
# of being the flag's default: ml_collections loads a default config (and applies `--config.<field>` overrides) while
# the flag is defined, at import, where a bad override would escape `parse_flags` as a traceback.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'autoencoder.py')

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Config file (every AETrainConfig field), optionally with variants: configs/autoencoder.py:f4,gan '
  "(default: the repository's configs/autoencoder.py). Override fields with --config.<field>=<value>.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics.jsonl, export/.')
_CACHE = flags.DEFINE_string(
  'cache',
  None,
  'Instead of --workdir: a cache folder; trains into <cache>/ae-<settings '
  'hash>/ unless that already holds a finished export, and prints the export folder.',
)
_EXPORT = flags.DEFINE_string('export', None, 'Export folder (default <workdir>/export); not with --cache.')
_VERBOSE = define_verbose_flag()


def train_autoencoder() -> None:
  # OSError: ml_collections defers an unreadable config file's error to the config's first use.
  cfg = AETrainConfig.from_config_dict(_CONFIG.value)
  if _CACHE.value:
    print(ensure_autoencoder(_CACHE.value, **dataclasses.asdict(cfg)))
    return
  info = train(cfg, _WORKDIR.value, export_dir=_EXPORT.value)
  print(json.dumps({k: info[k] for k in ('step', 'scaling_factor', 'heldout_psnr', 'train_seconds')}))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if (_WORKDIR.value is None) == (_CACHE.value is None):
    raise app.UsageError('give exactly one of --workdir and --cache.')
  if _CACHE.value and _EXPORT.value:
    raise app.UsageError('--export goes with --workdir; with --cache the export is <cache>/ae-<hash>/export.')
  setup_logging()
  run_or_exit(train_autoencoder, USER_ERRORS + (ValueError, OSError), verbose=_VERBOSE.value)


if __name__ == '__main__':
  app.run(main, flags_parser=flags_parser(DEFAULT_CONFIG))
