"""`python -m lpl_jax.main` end to end (subprocesses on the CPU demo config): exact resume after SIGKILL, save on
SIGTERM, post-training from a pre-training checkpoint, a non-finite loss stops the run, and CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lpl_jax import data as data_lib
from lpl_jax.train import loop
from tests.run import common


def _leaves(workdir, step):
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope='module')
def pretrained(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pretrain')
  common.run_main(
    env,
    'pretrain',
    workdir,
    '--config.total_steps=4',
    '--config.checkpoint_every=2',
    '--config.profile.start_step=1',
    '--config.profile.num_steps=2',
  )
  return workdir


@pytest.mark.slow
def test_a_run_logs_its_cost_and_writes_its_profile(pretrained):
  """Throughput in every row (no MFU: a CPU has no known peak), the compiled step's figures once, and a trace of
  the profile window that TensorBoard's profile plugin reads."""
  rows = [json.loads(line) for line in open(pretrained / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert r['perf/step_s'] > 0 and r['perf/images_per_s'] > 0 and r['perf/tflops_per_device'] > 0
    assert r['perf/images_per_s'] * r['perf/step_s'] == pytest.approx(16)  # the demo's global batch
    assert 'perf/mfu' not in r
  once = [r for r in rows if 'perf/compile_s' in r]
  assert [r['step'] for r in once] == [1] and once[0]['perf/compile_s'] > 0
  assert 0 < once[0]['perf/memory_argument_gib'] <= once[0]['perf/memory_peak_gib']
  traces = list((pretrained / 'profile' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


POST = ('--config.total_steps=8', '--config.checkpoint_every=2')


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(env, pretrained, tmp_path):
  init = f'--config.init.checkpoint={pretrained}'
  ref = tmp_path / 'uninterrupted'
  common.run_main(env, 'post,lpl', ref, init, *POST)
  kill_at = int(np.random.default_rng().integers(3, 7))
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(
    common.main_cmd('post,lpl', killed, init, *POST),
    cwd=common.ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  common.wait_for_step(proc, killed, kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  survived = common.checkpoint_steps(killed)
  assert survived and max(survived) < 8, (kill_at, survived)
  common.run_main(env, 'post,lpl', killed, init, *POST)
  ref_leaves, leaves = _leaves(ref, 8), _leaves(killed, 8)
  assert len(ref_leaves) == len(leaves)
  for a, b in zip(ref_leaves, leaves, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=f'killed at step {kill_at}')
  assert os.path.exists(killed / 'samples' / '00000008.png')
  metrics = [json.loads(line) for line in open(ref / 'metrics.jsonl')]
  assert all(m['loss/lpl'] > 0 and m['lpl/rows'] > 0 for m in metrics)


@pytest.mark.slow
def test_post_training_starts_from_the_pretraining_checkpoint(pretrained):
  run = loop.setup(
    common.experiment('demo_cpu.py', 'post,lpl', **{'init.checkpoint': str(pretrained)}), compile_step=False
  )
  state = loop.restore_init(run)  # the step the loop takes when no checkpoint exists
  saved = ocp.StandardCheckpointer().restore(os.path.join(pretrained, 'checkpoints', '4', 'state'))
  for part in ('params', 'ema_params'):
    for a, b in zip(jax.tree.leaves(getattr(state, part)), jax.tree.leaves(saved[part]), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == 0 and int(saved['step']) == 4
  fresh = jax.tree.leaves(run.state.opt_state)
  for a, b in zip(jax.tree.leaves(state.opt_state), fresh, strict=True):  # optimizer fresh by default
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_stops(env, tmp_path):
  workdir = tmp_path / 'preempted'
  proc = subprocess.Popen(
    common.main_cmd('pretrain', workdir, '--config.total_steps=100000', '--config.checkpoint_every=1000'),
    cwd=common.ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  common.wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 75, err[-3000:]  # stopped early, a checkpoint saved: rerun to continue
  steps = common.checkpoint_steps(workdir)
  assert 'preempted: saved step' in err
  assert steps and 3 <= steps[-1] < 1000, steps
  with open(workdir / 'checkpoints' / str(steps[-1]) / 'data' / 'metadata') as f:
    assert json.load(f) == {'next_index': steps[-1]}
  status = json.loads((workdir / 'status.json').read_text())
  assert (status['state'], status['step'], status['total_steps']) == ('stopped', steps[-1], 100000)


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_term_and_keeps_the_last_good_checkpoint(env, tmp_path):
  cache = str(tmp_path / 'cache')
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((64, 4, 4, 4)).astype(np.float32)
  latents[40, 1, 2, 3] = np.nan  # record 40: in the third batch of 16 (no shuffling)
  with data_lib.LatentCacheWriter(cache, resolution=32, scaling_factor=1.0) as w:
    w.add(latents, np.arange(64, dtype=np.int32) % 8)
  workdir = tmp_path / 'nan'
  proc = common.run_main(
    env,
    'pretrain',
    workdir,
    f'--config.data.source=cache:{cache}',
    '--config.data.shuffle=False',
    '--config.total_steps=6',
    '--config.checkpoint_every=2',
    check=False,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'step 3: loss/total = nan' in proc.stderr
  # The message says what the kept checkpoint holds, and that step 3 evaluated its params.
  assert 'The newest checkpoint is step 2' in proc.stderr and 'param_norm' in proc.stderr
  assert 'step 3 evaluated its params, so they may be bad too' in proc.stderr
  steps = common.checkpoint_steps(workdir)
  assert steps == [2]
  assert all(np.all(np.isfinite(x)) for x in _leaves(workdir, 2))


@pytest.mark.parametrize(
  'override,message',
  [
    ('--config.data.nope=1', "error: --config.data.nope: the config has no field 'nope'"),
    ('--config.total_steps=abc', 'error: flag --config.total_steps=abc: invalid literal for int() with base 10'),
    ('--config.data.resolution=36', "error: data.resolution=36 is not a multiple of the autoencoder's downsampling"),
  ],
)
def test_bad_command_line_fails_before_compiling(env, tmp_path, override, message):
  start = time.time()
  proc = common.run_main(env, 'pretrain', tmp_path / 'w', override, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints'), 'nothing may run before the config is checked'
  assert time.time() - start < 300


@pytest.mark.slow
def test_sample_cli_writes_adm_layout(env, pretrained, tmp_path):
  out = tmp_path / 'samples'
  cmd = [
    sys.executable,
    '-m',
    'lpl_jax.sample',
    f'--workdir={pretrained}',
    '--num=5',
    '--batch_size=4',
    '--steps=3',
    f'--out={out}',
  ]
  proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '5 samples of step 4 (EMA params)' in proc.stdout
  with np.load(out / 'samples.npz') as f:
    images, labels = f['arr_0'], f['arr_1']
  assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
  np.testing.assert_array_equal(labels, np.arange(5))
  assert os.path.getsize(out / 'grid.png') > 0
  missing = subprocess.run(
    cmd[:3] + [f'--workdir={tmp_path / "nothing"}'],
    cwd=common.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert missing.returncode != 0 and 'config.json does not exist' in missing.stderr


def test_library_modules_define_no_command_line_flags(env):
  """Only the entry points define absl flags, each in its own process: every module of every subpackage imports
  together without defining one (a library module that did would clash with them, `DuplicateFlagError`)."""
  code = (
    'import pkgutil, importlib, lpl_jax\nfrom absl import flags\n'
    'for m in pkgutil.walk_packages(lpl_jax.__path__, "lpl_jax."):\n'
    '  if m.ispkg or m.name.count(".") > 1: importlib.import_module(m.name)\n'
    'print(sorted(n for n in ("workdir", "config", "num", "steps", "seed") if n in flags.FLAGS))'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == '[]'
