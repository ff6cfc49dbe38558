"""The whole loop with LPL on 2 processes x 2 CPU devices (jax.distributed, gloo) writes what 1 process x 4 devices
writes: metrics (the LPL loss among them), sample grids (the images gathered from both processes), checkpoints
(params within 1e-5), config and status, through a resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tests.run import common


def _env(devices, cache):
  return dict(common.cli_env(cache), XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _params(workdir, step):
  """The params of a checkpoint, restored onto this process's one device whatever devices saved them."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = checkpointer.metadata(path).item_metadata.tree
  state = checkpointer.restore(
    path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  )
  return [np.asarray(x) for x in jax.tree.leaves(state['params'])]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path, diffusers_folder):
  port = common.free_port()
  folder, _ = diffusers_folder('tiny')  # the tiny preset's architecture, random weights
  cmd = [sys.executable, '-m', 'tests.run.multiprocess_loop']
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  procs = [
    subprocess.Popen(
      cmd + [str(multi), folder, str(port), str(i)],
      cwd=common.ROOT,
      env=_env(2, tmp_path / 'cache_multi'),
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  subprocess.run(
    cmd + [str(single), folder], cwd=common.ROOT, env=_env(4, tmp_path / 'cache_single'), check=True, timeout=900
  )
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]

  one, two = _metrics(single), _metrics(multi)
  assert [r['step'] for r in one] == [r['step'] for r in two] == [1, 2, 3, 4]
  assert all(r['loss/lpl'] > 0 and r['lpl/rows'] > 0 for r in one), 'LPL must be active in every step'
  for a, b in zip(one, two, strict=True):
    for key in ('loss/total', 'loss/diffusion', 'loss/lpl', 'grad_norm', 'param_norm'):
      assert b[key] == pytest.approx(a[key], rel=1e-5), (a['step'], key)
    assert b['lpl/rows'] == a['lpl/rows'], a['step']
  assert common.tensorboard_steps(multi / 'tensorboard') == [1, 2, 3, 4]
  for name in ('00000002.png', '00000004.png'):
    a = np.asarray(Image.open(single / 'samples' / name)).astype(int)
    b = np.asarray(Image.open(multi / 'samples' / name)).astype(int)
    assert a.std() > 0 and np.abs(a - b).max() <= 1, name  # the 4 images of both processes, in order
  assert common.checkpoint_steps(multi) == common.checkpoint_steps(single) == [2, 4]
  ref, got = _params(single, 4), _params(multi, 4)
  for a, b in zip(ref, got, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  scale = max(np.max(np.abs(a)) for a in ref)
  assert max(np.max(np.abs(b - a)) for a, b in zip(ref, got, strict=True)) <= 1e-5 * scale
  for workdir in (single, multi):
    status = json.loads((workdir / 'status.json').read_text())
    assert (status['state'], status['step']) == ('finished', 4)
    assert json.loads((workdir / 'config.json').read_text())['total_steps'] == 4
    assert not os.path.exists(workdir / 'lock.json')
