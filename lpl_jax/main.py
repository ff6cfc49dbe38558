"""Trains a latent diffusion model from an ml_collections config, resuming from the workdir if it holds a checkpoint.

  python -m lpl_jax.main --config=configs/imagenet.py:post512,lpl --workdir=runs/x --config.total_steps=1000

Several hosts (Cloud TPU pods): run the same command on every host; `jax.distributed.initialize()` is called when
`--multihost` (on TPU VMs it finds the coordinator itself).
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lpl_jax import experiment, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally with a variant: file.py:variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-host runs).')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a clear error for a `--config.a.b=v` override naming a field the config does not have
  (ml_collections raises a bare KeyError/AttributeError there)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
  except (KeyError, AttributeError) as e:
    key = str(e).strip('\'"')
    names = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    bad = [n for n in names if key in n.split('.')] or names
    print(f'error: {", ".join(bad)}: the config has no field {key!r}; overrides must name an existing field of the '
          'config file (see docs/configs.md).', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if _CONFIG.value is None:
    raise app.UsageError('--config is required.')
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (experiment.ConfigError, trainer.NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
