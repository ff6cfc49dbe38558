"""Faults injected into a workdir, through `python -m lpl_jax.main`: a corrupt newest checkpoint and an interrupted
save (quarantined; the run saves that step again, no good checkpoint lost), a restart after the checkpoints were
deleted (a new history), two trainers at once (the second stops, naming the first; a dead holder's lock is taken
over), a loss spike (the guard stops the run before the diverging step is saved), and bad input of every kind (one
`error:` line, exit status 2, nothing compiled)."""

import glob
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from lpl_jax import data as data_lib
from tests.run import common


def _leaves(folder):
  state = ocp.StandardCheckpointer().restore(os.path.join(folder, 'state'))
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def _truncate_arrays(folder):
  """Cuts every array file of a checkpoint short (a disk that filled up, a copy cut short)."""
  for root, _, files in os.walk(os.path.join(folder, 'state')):
    for name in files:
      if 'ocdbt' in root or name.startswith('d') or root.endswith('/d'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(7)


def _error_line(proc):
  """The one `error:` line of a failed run (and no traceback)."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-3000:]
  return lines[0]


def _moved(stderr):
  return [line for line in stderr.splitlines() if ' moved ' in line]


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_quarantined_the_history_resumes_cleanly_and_a_new_one_starts_after_a_wipe(
  env, tmp_path
):
  workdir = tmp_path / 'run'
  common.run_main(env, 'pretrain', workdir, '--config.total_steps=4', '--config.checkpoint_every=2')
  assert common.checkpoint_steps(workdir) == [2, 4] and common.logged_steps(workdir) == [1, 2, 3, 4]
  good = _leaves(workdir / 'checkpoints' / '2')
  _truncate_arrays(workdir / 'checkpoints' / '4')
  leftover = workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1234'  # what a run killed mid-save leaves
  (leftover / 'state').mkdir(parents=True)

  # Resume: 4 is moved aside (one line each, with the cause), the run goes on from 2 and saves 4 and 6 again.
  proc = common.run_main(env, 'pretrain', workdir, '--config.total_steps=6', '--config.checkpoint_every=2')
  moved = _moved(proc.stderr)
  assert len(moved) == 2, proc.stderr[-3000:]
  assert any('6.orbax-checkpoint-tmp-1234 to ' in m and 'an interrupted save' in m for m in moved)
  assert any('checkpoint 4 cannot be restored' in m and len(m) < 600 for m in moved)
  assert 'resumed from' in proc.stderr and 'at step 2' in proc.stderr
  assert common.checkpoint_steps(workdir) == [2, 4, 6]
  for a, b in zip(good, _leaves(workdir / 'checkpoints' / '2'), strict=True):
    np.testing.assert_array_equal(a, b)  # the checkpoint it resumed from is kept
  assert sorted(n.split('-')[0] for n in os.listdir(workdir / 'checkpoints' / 'corrupt')) == ['4', '6.orbax']
  # Each step once, in the metrics log and in what TensorBoard shows (rows 3-4 were re-computed).
  assert common.logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert common.tensorboard_steps(workdir / 'tensorboard') == [1, 2, 3, 4, 5, 6]

  # The checkpoints deleted: a fresh start says so and begins a new history, the old one kept aside.
  shutil.rmtree(workdir / 'checkpoints')
  proc = common.run_main(env, 'pretrain', workdir, '--config.total_steps=2', '--config.checkpoint_every=2')
  assert 'starting a new one at step 0' in proc.stderr, proc.stderr[-3000:]
  assert common.logged_steps(workdir) == [1, 2]
  assert common.tensorboard_steps(workdir / 'tensorboard') == [1, 2]
  (previous,) = glob.glob(str(workdir / 'previous' / '*'))
  assert common.logged_steps(previous) == [1, 2, 3, 4, 5, 6]
  assert common.tensorboard_steps(os.path.join(previous, 'tensorboard')) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_second_trainer_stops_naming_the_first_and_a_dead_trainers_lock_is_taken_over(env, tmp_path):
  workdir = tmp_path / 'busy'
  first = subprocess.Popen(
    common.main_cmd('pretrain', workdir, '--config.total_steps=100000', '--config.checkpoint_every=2'),
    cwd=common.ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    common.wait_for_step(first, workdir, 2)
    second = common.run_main(env, 'pretrain', workdir, '--config.total_steps=4', check=False)
    line = _error_line(second)
    assert f'is in use by pid {first.pid} on host ' in line and '--force' in line, line
    assert first.poll() is None, 'the first trainer runs on'
  finally:
    first.send_signal(signal.SIGKILL)  # a lost machine: its lock stays behind
    first.wait()
  logged = common.logged_steps(workdir)
  assert logged == list(range(1, len(logged) + 1)), 'the second trainer wrote nothing'
  assert os.path.exists(workdir / 'lock.json')
  resumed_at = common.checkpoint_steps(workdir)[-1]
  third = common.run_main(env, 'pretrain', workdir, f'--config.total_steps={resumed_at + 1}')
  assert f'taking over the lock of pid {first.pid}' in third.stderr, third.stderr[-3000:]
  assert 'its process is gone' in third.stderr
  assert common.logged_steps(workdir) == list(range(1, resumed_at + 2))
  assert not os.path.exists(workdir / 'lock.json'), 'released at the end'


@pytest.mark.slow
def test_a_loss_spike_stops_the_run_before_the_diverging_checkpoint_is_kept(env, tmp_path):
  # lr 0.05 without clipping: the diffusion loss of step 4 jumps to about 50x the median of steps 1-3.
  workdir = tmp_path / 'spike'
  proc = common.run_main(
    env,
    'pretrain',
    workdir,
    '--config.total_steps=20',
    '--config.checkpoint_every=1',
    '--config.keep_checkpoints=10',
    '--config.optim.lr=0.05',
    '--config.optim.warmup_steps=0',
    '--config.optim.grad_clip=0',
    '--config.guard.loss_spike=10',
    '--config.guard.window=3',
    check=False,
  )
  line = _error_line(proc)
  assert line.startswith('error: step 4: loss/diffusion = ') and '(guard.loss_spike = 10)' in line, line
  assert 'Checkpoint 3, whose params step 4 evaluated, was moved to ' in line
  assert 'The newest checkpoint is step 2' in line and 'its params passed the checks at step 3' in line
  assert common.checkpoint_steps(workdir) == [1, 2], 'every checkpoint before the suspect one is kept'
  (suspect,) = os.listdir(workdir / 'checkpoints' / 'suspect')
  assert suspect.startswith('3-')
  assert common.logged_steps(workdir) == [1, 2, 3]
  assert all(np.all(np.isfinite(x)) for x in _leaves(workdir / 'checkpoints' / '2'))


def _truncated_cache(tmp_path):
  cache = tmp_path / 'cache'
  latents = np.random.default_rng(0).standard_normal((48, 4, 4, 4)).astype(np.float32)
  with data_lib.LatentCacheWriter(cache, resolution=32, scaling_factor=1.0, shard_size=16) as w:
    w.add(latents, np.arange(48, dtype=np.int32) % 8)
  with open(cache / 'mean-00001.npy', 'r+b') as f:
    f.truncate(1000)
  return [f'--config.data.source=cache:{cache}'], "latent cache shard '" + str(cache / 'mean-00001.npy')


def _bad_image(tmp_path):
  folder = tmp_path / 'images' / 'cat'
  folder.mkdir(parents=True)
  for i in range(7):
    Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(folder / f'{i}.png')
  (folder / '7.png').write_bytes(b'not an image')
  source = f'--config.data.source=folder:{tmp_path / "images"}'
  return [
    source,
    '--config.data.global_batch=8',
    '--config.data.shuffle=False',
  ], f"cannot decode image '{folder}/7.png'"


def _missing_folder(tmp_path):
  return [
    f'--config.data.source=folder:{tmp_path / "nowhere"}'
  ], f"image folder '{tmp_path / 'nowhere'}' does not exist"


def _bad_weights(tmp_path, folder):
  weights = tmp_path / 'vae'
  shutil.copytree(folder, weights)
  with open(weights / 'diffusion_pytorch_model.safetensors', 'r+b') as f:
    f.truncate(5000)
  return [f'--config.autoencoder.weights={weights}'], f"error: autoencoder.weights='{weights}': "


def _workdir_is_a_file(tmp_path):
  (tmp_path / 'w').write_text('')
  return [], f"workdir '{tmp_path / 'w'}' is a file"


@pytest.fixture
def read_only_workdir(tmp_path):
  """An existing workdir nothing may be written to (immutable: root ignores permission bits)."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  if subprocess.run(['chattr', '+i', str(workdir)], capture_output=True).returncode:
    if os.geteuid() == 0:
      pytest.skip('chattr +i is not supported here and root ignores permission bits')
    workdir.chmod(0o555)
  yield
  subprocess.run(['chattr', '-i', str(workdir)], capture_output=True)
  workdir.chmod(0o755)


def _read_only(tmp_path):
  return [], f"workdir '{tmp_path / 'w'}' is not writable"


@pytest.mark.parametrize(
  'fault',
  ['truncated_cache', 'bad_image', 'missing_folder', 'bad_weights', 'workdir_is_a_file', 'read_only_workdir'],
)
def test_bad_input_ends_in_one_error_line_naming_it_before_anything_compiles(
  env, tmp_path, fault, diffusers_folder, request
):
  if fault == 'read_only_workdir':
    request.getfixturevalue('read_only_workdir')
    overrides, message = _read_only(tmp_path)
  elif fault == 'bad_weights':
    overrides, message = _bad_weights(tmp_path, diffusers_folder('tiny')[0])
  else:
    overrides, message = globals()[f'_{fault}'](tmp_path)
  start = time.time()
  proc = common.run_main(dict(env, JAX_LOG_COMPILES='1'), 'pretrain', tmp_path / 'w', *overrides, check=False)
  line = _error_line(proc)
  assert message in line, line
  assert 'Compiling' not in proc.stderr, 'input errors come before anything compiles'
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints') and not os.path.exists(tmp_path / 'w' / 'lock.json')
  assert time.time() - start < 120


def test_verbose_keeps_the_traceback(env, tmp_path):
  overrides, message = _missing_folder(tmp_path)
  proc = common.run_main(env, 'pretrain', tmp_path / 'w', *overrides, '--verbose', check=False)
  assert proc.returncode == 2 and 'Traceback' in proc.stderr and f'error: {message}' in proc.stderr
