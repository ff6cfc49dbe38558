"""Fakes for the launch scripts: a `gcloud` that records its argv, and TPU VM workers on the local disk.

The fake `gcloud` appends each call's argv (a JSON list, `gcloud` first) to `calls.jsonl`, prints a state for
`describe` ($FAKE_TPU_STATE, default READY; $FAKE_QR_STATE for queued resources, default ACTIVE) and, for `scp`,
keeps a copy of the file it was asked to send. A fake worker is a home folder holding a copy of launch/ and a
`.venv/bin/python` that records its argv and environment: an ssh `--command` recorded by the fake gcloud runs there
with `bash -c`, as the worker's login shell would run it.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / 'launch'

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
log = os.environ['FAKE_GCLOUD_LOG']
argv = ['gcloud'] + sys.argv[1:]
with open(log, 'a') as f:
  f.write(json.dumps(argv) + '\\n')
if 'describe' in argv:
  queued = 'queued-resources' in argv
  print(os.environ.get('FAKE_QR_STATE', 'ACTIVE') if queued else os.environ.get('FAKE_TPU_STATE', 'READY'))
if 'scp' in argv:
  src = argv[argv.index('scp') + 1]
  shutil.copy(src, os.path.join(os.path.dirname(log), 'shipped.tar.gz'))
"""

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys, time
with open(os.path.join(os.environ['HOME'], 'python_calls.jsonl'), 'a') as f:
  env = {{k: os.environ.get(k) for k in ('PYTHONUNBUFFERED', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                       'CUDA_VISIBLE_DEVICES', 'MY_FLAG', 'TPU_WORKER_ID')}}
  f.write(json.dumps({{'argv': sys.argv[1:], 'env': env, 'cwd': os.getcwd()}}) + '\\n')
print('fake trainer started', flush=True)
time.sleep(float(os.environ.get('FAKE_PYTHON_SLEEP', '0')))
"""


def _executable(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


class Launch:
  """Runs launch/*.sh with the fake gcloud first on PATH; `calls()` is what gcloud received."""

  def __init__(self, tmp_path: Path):
    self.tmp = tmp_path
    self.bin = tmp_path / 'bin'
    self.bin.mkdir()
    _executable(self.bin / 'gcloud', FAKE_GCLOUD)
    self.log = tmp_path / 'calls.jsonl'
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LPL_TPU_', 'FAKE_', 'TPU_WORKER_ID'))}
    self.env = {
      **env,
      'PATH': f'{self.bin}{os.pathsep}{env["PATH"]}',
      'FAKE_GCLOUD_LOG': str(self.log),
      'TMPDIR': str(tmp_path),
    }

  def run(self, script: str, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
      ['bash', str(LAUNCH / script), *args],
      capture_output=True,
      text=True,
      env={**self.env, **env},
      cwd=self.tmp,
      timeout=30,
    )
    if check and result.returncode != 0:
      raise AssertionError(f'{script} {args} exited {result.returncode}: {result.stderr}')
    return result

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def worker(self, worker_id: int) -> 'Worker':
    return Worker(self.tmp / f'worker{worker_id}', worker_id, self.env)


class Worker:
  """A TPU VM worker's home folder with the repo's launch/ copied to ~/lpl-jax and a fake ~/lpl-jax/.venv."""

  def __init__(self, home: Path, worker_id: int, env: dict[str, str]):
    self.home = home
    self.repo = home / 'lpl-jax'
    shutil.copytree(LAUNCH, self.repo / 'launch')
    (self.repo / '.venv' / 'bin').mkdir(parents=True)
    _executable(self.repo / '.venv' / 'bin' / 'python', FAKE_PYTHON)
    self.env = {**env, 'HOME': str(home), 'TPU_WORKER_ID': str(worker_id)}

  def sh(self, command: str, **env: str) -> subprocess.CompletedProcess:
    """Runs an ssh --command as the worker's login shell does: `bash -c COMMAND` in the home folder."""
    return subprocess.run(
      ['bash', '-c', command], capture_output=True, text=True, cwd=self.home, env={**self.env, **env}, timeout=30
    )

  def trainer_calls(self, count: int = 1, timeout: float = 10.0) -> list[dict]:
    """The fake trainer's records, waiting for `count` of them (it starts in the background)."""
    file = self.home / 'python_calls.jsonl'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if file.exists():
        lines = file.read_text().splitlines()
        if len(lines) >= count:
          return [json.loads(line) for line in lines]
      time.sleep(0.02)
    raise AssertionError(f'the trainer did not start on {self.home}')


@pytest.fixture
def launch(tmp_path):
  return Launch(tmp_path)
