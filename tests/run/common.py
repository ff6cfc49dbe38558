"""Loading config files by path, as `--config=configs/X.py:variant` does."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(ROOT, 'configs')
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))


def load(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIG_DIR, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_variants():
  return [(name, variant) for name in CONFIG_FILES for variant in load(name).VARIANTS]
