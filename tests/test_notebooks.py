"""The Colab notebooks run top to bottom (small settings) on the CPU. The experiment notebook runs in
tests/test_demo.py, on the workdir of the quick demo run there (the same pipeline, run once per session)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.run import common

ROOT = common.ROOT


def execute(name, tmp_path, monkeypatch, cache, **env):
  """Runs notebooks/NAME in a kernel whose working folder is tmp_path, with LPL_NOTEBOOK_QUICK=1 and ENV set."""
  # The kernel compiles through the session's compilation cache (what the demo's test and the CLI tests compiled).
  for k, v in dict(common.cli_env(cache), LPL_NOTEBOOK_QUICK='1', **env).items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'commit notebooks with outputs stripped'
  NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
  return nb


def printed(nb):
  """Everything the notebook's code cells printed."""
  return '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch, compilation_cache_dir):
  nb = execute('lpl_quickstart.ipynb', tmp_path, monkeypatch, compilation_cache_dir, LPL_AE_FOLDER='')
  text = printed(nb)
  assert 'RANDOM weights' in text and 'perturbation  0.40: LPL' in text
  assert 'baseline {' in text and 'LPL {' in text
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 2
