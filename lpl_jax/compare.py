"""A paired, multi-seed comparison of post-training variants, with confidence intervals.

  python -m lpl_jax.compare --config=configs/imagenet.py:post256 --workdir=runs/cmp --seeds=3 \\
      --variants=baseline,lpl,lpl_tau2=lpl+lpl.tau=2 --config.init.checkpoint=runs/in_pre \\
      --config.eval.reference=refs/in256.npz --config.eval.inception_weights=/weights/pt_inception.pth

Every variant is post-trained from the config's `init.checkpoint` with the same seeds (seed i: the same batches,
timesteps and noise in every variant), evaluated the same way (the training loop's evaluation against
`eval.reference`, with a bootstrap of the Frechet distance, and the x0-hat fidelity curve on held-out images), and
`<workdir>/report.md` gives each metric's mean and interval over seeds and the paired difference to the first
variant with its p-value. Running the command again continues a stopped comparison. Variants: `baseline` (the
config as given), `lpl` (the config file's `lpl` variant), or `NAME=PART[+PART...]` with field overrides
`section.field=value` and config-file variant tokens (lpl_jax/workflows/compare.py, docs/compare.md).

Exit status: 0 when the report is written, 2 for an error in the input, 75 when a run was preempted (rerun).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lpl_jax.cli import define_verbose_flag, fail, parse_flags_or_exit, run_or_exit, setup_logging
from lpl_jax.workflows import compare

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and variant: file.py:variant.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs, results.json and report.md go.', required=True)
_VARIANTS = flags.DEFINE_string('variants', 'baseline,lpl', 'Comma-separated variants; the first is the baseline.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per variant (paired across variants).')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'The first seed.')
_FID_SOURCE = flags.DEFINE_string('fidelity_source', '', "Held-out images of the fidelity curve ('' = data.source).")
_FID_SPLIT = flags.DEFINE_string('fidelity_split', '', "Their split ('' = data.split).")
_FID_IMAGES = flags.DEFINE_integer('fidelity_images', 64, 'How many held-out images.')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, "Resamples of the Frechet distance's bootstrap.")
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs in <workdir>/compilation_cache.')
_VERBOSE = define_verbose_flag()
PREEMPTED = 75


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}')
  setup_logging()
  if _CONFIG.value is None:
    fail('--config is required.')
  if _CACHE.value and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.join(_WORKDIR.value, 'compilation_cache'))

  def go():
    settings = compare.CompareSettings(
      seeds=_SEEDS.value,
      first_seed=_FIRST_SEED.value,
      fidelity_source=_FID_SOURCE.value,
      fidelity_split=_FID_SPLIT.value,
      fidelity_images=_FID_IMAGES.value,
      bootstrap=_BOOTSTRAP.value,
    )
    spec = config_flags.get_config_filename(flags.FLAGS['config'])
    load = compare.config_loader(spec, config_flags.get_override_values(flags.FLAGS['config']))
    variants = compare.parse_variants(_VARIANTS.value)
    experiments = {v.name: compare.experiment_of(load, v) for v in variants}
    print(f'lpl-jax compare on {compare.device_summary()}: {", ".join(f"{v.name} = {v.spec()}" for v in variants)}')
    return compare.run(_WORKDIR.value, experiments, settings, title=f'Paired comparison, {spec}')

  path = run_or_exit(go, verbose=_VERBOSE.value)
  if path is None:
    sys.exit(PREEMPTED)
  print(f'report: {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
