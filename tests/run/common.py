"""Loading experiment config files, as `--config=configs/X.py:variant` does, and running `python -m lpl_jax.main`
on the CPU demo config in a subprocess."""

import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import time

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


DEMO = os.path.join(CONFIG_DIR, 'demo_cpu.py')


def cli_env(cache_dir):
  """The environment of trainer subprocesses: the CPU, and a shared persistent compilation cache (each config
  compiles once per session)."""
  return dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=ROOT,
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )


def main_cmd(variant, workdir, *overrides):
  """`python -m lpl_jax.main` on `configs/demo_cpu.py:<variant>`, logging every step, 4 small sample images."""
  return [
    sys.executable,
    '-m',
    'lpl_jax.main',
    f'--config={DEMO}:{variant}',
    f'--workdir={workdir}',
    '--config.log_every=1',
    '--config.progress=False',
    '--config.num_sample_images=4',
    '--config.sample.steps=2',
    *overrides,
  ]


def run_main(env, *args, check=True):
  proc = subprocess.run(main_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if check and proc.returncode:
    raise AssertionError(f'exit {proc.returncode}:\n{proc.stderr[-4000:]}')
  return proc


def logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip()]


def wait_for_step(proc, workdir, step):
  deadline = time.time() + 900
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'the run ended (exit {proc.returncode}) before step {step}')
    if any(s >= step for s in logged_steps(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError(f'step {step} not reached')


def checkpoint_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(folder) else []


def tensorboard_steps(folder, tag='loss/total'):
  """The steps of `tag` that TensorBoard shows in `folder` (local or remote): the event files read in order, a
  `SessionLog.START` at step T hiding the events of steps >= T read before it (TensorBoard's rule for a restarted
  run)."""
  from etils import epath
  from tensorboardX.proto import event_pb2

  steps = []
  for path in sorted(epath.Path(folder).glob('events.out.tfevents.*'), key=str):
    raw = path.read_bytes()
    pos = 0
    while pos < len(raw):  # TFRecord: length (u64), its crc (u32), data, its crc (u32)
      (n,) = struct.unpack('<Q', raw[pos : pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n])
      pos += 16 + n
      if event.HasField('session_log') and event.session_log.status == event_pb2.SessionLog.START:
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


# A short loop for the tests of the loop itself: every step logged, a checkpoint and a sample grid every 2 steps.
LOOP_SETTINGS = {
  'log_every': 1,
  'checkpoint_every': 2,
  'sample_every': 2,
  'num_sample_images': 4,
  'progress': False,
  'sample.steps': 2,
}


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
