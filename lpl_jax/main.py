"""Trains a latent diffusion model from a config file, resuming from the workdir if it holds a checkpoint.

  python -m lpl_jax.main --config=configs/imagenet.py:post512,lpl --workdir=runs/x --config.total_steps=1000

Several hosts (Cloud TPU pods): run the same command on every host; `jax.distributed.initialize()` is called when
`--multihost` (on TPU VMs it finds the coordinator itself).

One trainer per workdir: a second one started on it stops with an error naming the first (host, PID). If that run
is gone but its lock looks alive (its machine was lost less than ten minutes ago), `--force` takes the workdir over.

Exit status: 0 when `total_steps` is reached; 2 for an error in the input (config, data, weights, workdir) or a
diverged run, in one `error:` line (`--verbose` prints the traceback too): rerunning fails the same way; 75 when a
preemption (SIGTERM) stopped the run after saving a checkpoint: rerun the same command to continue. A supervisor
restarts on anything but 0 and 2. Compiled programs are cached in `<workdir>/compilation_cache` (unless
$JAX_COMPILATION_CACHE_DIR names another place), so a restart does not compile again.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lpl_jax.cli import define_verbose_flag, fail, parse_flags_or_exit, run_or_exit, setup_logging
from lpl_jax.train import loop
from lpl_jax.train.config import Experiment

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, optionally with a variant: file.py:variant.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-host runs).')
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs in <workdir>/compilation_cache.')
_FORCE = flags.DEFINE_bool('force', False, "Take the workdir's lock even if another trainer seems to hold it.")
_VERBOSE = define_verbose_flag()
PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint saved; rerun to continue


def main(argv):
  if len(argv) > 1:  # status 2 like every input error: a supervisor must not restart it
    fail(f'unexpected arguments {argv[1:]}')
  setup_logging()
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if _CONFIG.value is None:
    fail('--config is required.')
  if _CACHE.value and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.join(_WORKDIR.value, 'compilation_cache'))
  outcome = run_or_exit(
    lambda: loop.train_and_evaluate(Experiment.from_config_dict(_CONFIG.value), _WORKDIR.value, force=_FORCE.value),
    verbose=_VERBOSE.value,
  )
  if not outcome.finished:
    sys.exit(PREEMPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
