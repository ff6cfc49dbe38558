"""Trains a latent diffusion model from a config file, resuming from the workdir if it holds a checkpoint.

  python -m lpl_jax.main --config=configs/imagenet.py:post512,lpl --workdir=runs/x --config.total_steps=1000

Several hosts (Cloud TPU pods): run the same command on every host; `jax.distributed.initialize()` is called when
`--multihost` (on TPU VMs it finds the coordinator itself).

One trainer per workdir: a second one started on it stops with an error naming the first (host, PID). If that run
is gone but its lock looks alive (its machine was lost less than ten minutes ago), `--force` takes the workdir over.
Errors in the input (config, data, weights, workdir) and a diverged run end with one `error:` line and exit status
2; `--verbose` prints the traceback too.
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from lpl_jax.cli import define_verbose_flag, parse_flags_or_exit, run_or_exit, setup_logging
from lpl_jax.train import loop
from lpl_jax.train.config import Experiment

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, optionally with a variant: file.py:variant.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-host runs).')
_FORCE = flags.DEFINE_bool('force', False, "Take the workdir's lock even if another trainer seems to hold it.")
_VERBOSE = define_verbose_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  setup_logging()
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if _CONFIG.value is None:
    raise app.UsageError('--config is required.')
  run_or_exit(
    lambda: loop.train_and_evaluate(Experiment.from_config_dict(_CONFIG.value), _WORKDIR.value, force=_FORCE.value),
    verbose=_VERBOSE.value,
  )


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
