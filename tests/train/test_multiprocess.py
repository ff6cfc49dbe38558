"""A real multi-process run: 2 processes x 2 CPU devices (jax.distributed, gloo) equal 1 process x 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(devices):
  return dict(
    os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT
  )


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  cmd = [sys.executable, '-m', 'tests.train.multiprocess_run']
  procs = [
    subprocess.Popen(cmd + [str(tmp_path / 'multi.npz'), str(port), str(i)], cwd=ROOT, env=_env(2)) for i in range(2)
  ]
  subprocess.run(cmd + [str(tmp_path / 'single.npz')], cwd=ROOT, env=_env(4), check=True, timeout=900)
  for p in procs:
    assert p.wait(timeout=900) == 0
  multi, single = np.load(tmp_path / 'multi.npz'), np.load(tmp_path / 'single.npz')
  assert np.all(single['losses'][:, 1] > 0), 'LPL must be active'
  np.testing.assert_allclose(multi['losses'], single['losses'], rtol=1e-5)
  assert np.max(np.abs(multi['params'] - single['params'])) <= 1e-5 * np.max(np.abs(single['params']))
