"""`make demo`: the paper's experiment in miniature on the embedded photographs, on a CPU, nothing downloaded.

  python -m lpl_jax.demo --workdir=runs/demo [--quick] [--seed=0]

An autoencoder trained on the photographs, a latent cache, reference statistics, a DiT pre-trained, then a paired
comparison (`python -m lpl_jax.compare`'s): several seeds of post-training from that checkpoint with and without
LPL, each run evaluated the same way, and `<workdir>/report.md` with the paired differences and their intervals.
The experiments are `configs/demo_cpu.py`'s; every stage skips what an earlier run finished
(lpl_jax/workflows/miniature.py).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from absl import app, flags

from configs import demo_cpu
from lpl_jax.cli import define_verbose_flag, parse_flags_or_exit, run_or_exit, setup_logging
from lpl_jax.train.config import Experiment
from lpl_jax.workflows import miniature

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Where every stage and the report go.')
_QUICK = flags.DEFINE_bool('quick', False, 'A few steps per stage (the test suite).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every stage (the comparison uses seed, seed + 1, ...).')
_VERBOSE = define_verbose_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  setup_logging(logging.WARNING)
  settings = miniature.DemoSettings.quick() if _QUICK.value else miniature.DemoSettings()
  experiments = {v: Experiment.from_config_dict(demo_cpu.get_config(v)) for v in miniature.VARIANTS}
  print(f'lpl-jax demo on {jax.device_count()} {jax.devices()[0].platform} device(s), workdir {_WORKDIR.value}')
  run_or_exit(
    lambda: miniature.run(_WORKDIR.value, experiments, dataclasses.replace(settings, seed=_SEED.value)),
    verbose=_VERBOSE.value,
  )


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
