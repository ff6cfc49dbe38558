"""Sharded steps equal single-device steps: 8 simulated devices in data, fsdp and mixed meshes, and 4 devices with
gradient accumulation over 2 micro-batches."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_meshes_match_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = tmp_path / 'runs.npz'
  subprocess.run(
    [sys.executable, '-m', 'tests.train.sharded_run', str(out)], cwd=ROOT, env=env, check=True, timeout=900
  )
  runs = np.load(out)
  ref_losses, ref_params = runs['one_losses'], runs['one_params']
  assert np.all(ref_losses[:, 1] > 0), 'LPL must be active in these steps'
  for name in ('data8', 'fsdp8', 'mixed', 'fsdp4_accum2'):
    np.testing.assert_allclose(runs[f'{name}_losses'], ref_losses, rtol=1e-5, err_msg=name)
    scale = np.max(np.abs(ref_params))
    assert np.max(np.abs(runs[f'{name}_params'] - ref_params)) <= 1e-5 * scale, name
