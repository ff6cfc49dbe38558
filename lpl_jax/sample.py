"""Samples from a training run's checkpoint: a PNG grid and an .npz in the ADM evaluator's layout.

  python -m lpl_jax.sample --workdir=runs/x [--noema] --num=N --sampler=ddim --steps=50 --cfg=1.5

Writes `<out>/grid.png` and `<out>/samples.npz` (`arr_0`: uint8 [N, H, W, 3], `arr_1`: int32 class labels for
class-conditional models), `<out>` defaulting to `<workdir>/samples_<step>`. The run's `config.json` gives the
models; `--sampler`, `--steps`, `--cfg` and `--eta` override its `sample` section. Batches are sharded over all
devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags
from etils import epath

from lpl_jax.cli import USER_ERRORS, define_verbose_flag, parse_flags_or_exit, run_or_exit, setup_logging
from lpl_jax.eval.report import save_grid
from lpl_jax.train import build
from lpl_jax.train.config import load_run
from lpl_jax.train.validate import validate

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run (holds config.json and checkpoints/).', required=True)
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step; -1 = the latest.')
_EMA = flags.DEFINE_bool('ema', True, 'Sample with the EMA params (--noema: the raw params).')
_NUM = flags.DEFINE_integer('num', 64, 'Number of samples.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Samples per compiled call (a multiple of the device count).')
_SAMPLER = flags.DEFINE_string('sampler', None, 'ddim | ddpm | euler | heun | rk4 (default: the config).')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampler steps (default: the config).')
_CFG = flags.DEFINE_float('cfg', None, 'Classifier-free guidance scale (default: the config).')
_ETA = flags.DEFINE_float('eta', None, 'DDIM eta (default: the config).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_LABELS = flags.DEFINE_enum('labels', 'cycle', ['cycle', 'random'], 'Class labels: 0, 1, 2, ... or uniform.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default <workdir>/samples_<step>).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar.')
_VERBOSE = define_verbose_flag()


def sample() -> None:
  exp = load_run(_WORKDIR.value)
  overrides = {'sampler': _SAMPLER.value, 'steps': _STEPS.value, 'guidance': _CFG.value, 'eta': _ETA.value}
  exp = exp.replace(sample={k: v for k, v in overrides.items() if v is not None})
  validate(exp, check_files=False)
  images, ys, step = build.samples_from_run(
    exp,
    _WORKDIR.value,
    num=_NUM.value,
    batch_size=_BATCH.value,
    seed=_SEED.value,
    labels=_LABELS.value,
    step=_STEP.value,
    ema=_EMA.value,
    progress=_PROGRESS.value and jax.process_index() == 0,
  )
  out = _OUT.value or os.path.join(_WORKDIR.value, f'samples_{step}')
  if jax.process_index() == 0:  # every process has all the images; one writes them (a local or gs:// folder)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    arrays = {'arr_0': images} if ys is None else {'arr_0': images, 'arr_1': ys}
    with epath.Path(out, 'samples.npz').open('wb') as f:
      np.savez(f, **arrays)
    save_grid(images[:64], os.path.join(out, 'grid.png'))
    print(
      f'{len(images)} samples of step {step} ({"EMA" if _EMA.value else "raw"} params) -> {out}/samples.npz, '
      f'{out}/grid.png'
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  setup_logging()
  run_or_exit(sample, USER_ERRORS + (ValueError,), verbose=_VERBOSE.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
