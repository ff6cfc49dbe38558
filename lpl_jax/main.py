"""Trains a latent diffusion model from a config file, resuming from the workdir if it holds a checkpoint.

  python -m lpl_jax.main --config=configs/imagenet.py:post512,lpl --workdir=runs/x --config.total_steps=1000

Several hosts (Cloud TPU pods): run the same command on every host; `jax.distributed.initialize()` is called when
`--multihost` (on TPU VMs it finds the coordinator itself).
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from lpl_jax.cli import parse_flags_or_exit, run_or_exit, setup_logging
from lpl_jax.train import loop
from lpl_jax.train.config import Experiment

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, optionally with a variant: file.py:variant.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-host runs).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  setup_logging()
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if _CONFIG.value is None:
    raise app.UsageError('--config is required.')
  run_or_exit(lambda: loop.train_and_evaluate(Experiment.from_config_dict(_CONFIG.value), _WORKDIR.value))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
