"""Samples from a training run's checkpoint: a PNG grid and an .npz in the ADM evaluator's layout.

  python -m lpl_jax.sample --workdir=runs/x [--noema] --num=N --sampler=ddim --steps=50 --cfg=1.5

Writes `<out>/grid.png` and `<out>/samples.npz` (`arr_0`: uint8 [N, H, W, 3], `arr_1`: int32 class labels for
class-conditional models), `<out>` defaulting to `<workdir>/samples_<step>`. The run's `config.json` gives the
models; `--sampler`, `--steps`, `--cfg` and `--eta` override its `sample` section. Batches are sharded over all
devices.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags

from lpl_jax import experiment as exp
from lpl_jax import trainer
from lpl_jax.sampling import generate, load_run_config

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


def main(argv):
  del argv
  c = load_run_config(_WORKDIR.value)
  for field, flag in (('sampler', _SAMPLER), ('steps', _STEPS), ('guidance', _CFG), ('eta', _ETA)):
    if flag.value is not None:
      c.sample[field] = flag.value
  try:
    exp.validate(c, check_files=False)
  except exp.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  images, ys, step = generate(c, _WORKDIR.value, num=_NUM.value, batch_size=_BATCH.value, seed=_SEED.value,
                              labels=_LABELS.value, step=_STEP.value, ema=_EMA.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, f'samples_{step}')
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    arrays = {'arr_0': images} if ys is None else {'arr_0': images, 'arr_1': ys}
    np.savez(os.path.join(out, 'samples.npz'), **arrays)
    trainer.save_grid(images[:64], os.path.join(out, 'grid.png'))
    print(f'{len(images)} samples of step {step} ({"EMA" if _EMA.value else "raw"} params) -> {out}/samples.npz, '
          f'{out}/grid.png')


if __name__ == '__main__':
  app.run(main)
