"""Loading experiment config files, as `--config=configs/X.py:variant` does."""

import importlib
import os

from lpl_jax.train.config import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(ROOT, 'configs')
# The experiment configs of lpl_jax.main (not the shared module, nor the autoencoder trainer's config).
CONFIG_FILES = sorted(
  f for f in os.listdir(CONFIG_DIR) if f.endswith('.py') and f not in ('__init__.py', 'common.py', 'autoencoder.py')
)


def load(name):
  return importlib.import_module(f'configs.{name[:-3]}')


def experiment(name, variant, **overrides):
  """The typed experiment of `configs/<name>:<variant>`, with `section.field` overrides as on the command line."""
  c = load(name).get_config(variant)
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (c[section] if section else c)[field] = value
  return Experiment.from_config_dict(c)


def all_variants():
  return [(name, variant) for name in CONFIG_FILES for variant in load(name).VARIANTS]
