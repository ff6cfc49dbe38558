"""Fakes for the launch scripts: a `gcloud` that records its argv, and TPU VM workers on the local disk.

The fake `gcloud` appends each call's argv (a JSON list, `gcloud` first) to `calls.jsonl`, prints a state for `describe`
($FAKE_TPU_STATE, default READY; $FAKE_QR_STATE for queued resources, default ACTIVE; the state NOT_FOUND fails as
gcloud does for a missing resource, ERROR fails otherwise), prints $FAKE_STATUS_JSON for `storage cat` (fails when
unset: no such object), exits $FAKE_CP_RC for `storage cp` after $FAKE_CP_SLEEP seconds (default 0), answers an ssh
`--command` that runs `worker.sh status` with $FAKE_SSH_OUTPUT and exit status $FAKE_SSH_RC and, for `scp`, keeps a copy
of the file it was asked to send. A fake worker is a home folder holding a copy of launch/ and a `.venv/bin/python` (a
fake trainer) that records its argv, environment and pid: an ssh `--command` recorded by the fake gcloud runs there with
`bash -c`, as the worker's login shell would run it.

The fake trainer sleeps $FAKE_PYTHON_SLEEP seconds, then exits with $FAKE_EXITS (default 0); both may be lists, one
value per start (`1,137,0`: the first start exits 1, the second is killed by SIGKILL, the third and later exit 0).
On SIGTERM it exits 75, as the real trainer does after saving a checkpoint; with $FAKE_IGNORE_TERM=1 it ignores it.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / 'launch'

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys, time
log = os.environ['FAKE_GCLOUD_LOG']
argv = ['gcloud'] + sys.argv[1:]
with open(log, 'a') as f:
  f.write(json.dumps(argv) + '\\n')
if 'describe' in argv:
  queued = 'queued-resources' in argv
  state = os.environ.get('FAKE_QR_STATE', 'ACTIVE') if queued else os.environ.get('FAKE_TPU_STATE', 'READY')
  if state == 'NOT_FOUND':
    sys.exit('ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource ' + repr(argv[5]) + ' was not found')
  if state == 'ERROR':
    sys.exit('ERROR: (gcloud.compute.tpus.describe) There was a problem refreshing your current auth tokens')
  print(state)
if argv[1:3] == ['storage', 'cat']:
  if 'FAKE_STATUS_JSON' not in os.environ:
    sys.exit('ERROR: (gcloud.storage.cat) The following URLs matched no objects or files: ' + argv[3])
  print(os.environ['FAKE_STATUS_JSON'])
if argv[1:3] == ['storage', 'cp']:
  time.sleep(float(os.environ.get('FAKE_CP_SLEEP', '0')))
  sys.exit(int(os.environ.get('FAKE_CP_RC', '0')))
if 'ssh' in argv and 'worker.sh status' in argv[-1]:
  print(os.environ.get('FAKE_SSH_OUTPUT', ''))
  sys.exit(int(os.environ.get('FAKE_SSH_RC', '0')))
if 'scp' in argv:
  src = argv[argv.index('scp') + 1]
  shutil.copy(src, os.path.join(os.path.dirname(log), 'shipped.tar.gz'))
"""

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
calls = os.path.join(os.environ['HOME'], 'python_calls.jsonl')
with open(calls, 'a') as f:
  env = {{k: os.environ.get(k) for k in ('PYTHONUNBUFFERED', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                       'CUDA_VISIBLE_DEVICES', 'MY_FLAG', 'TPU_WORKER_ID')}}
  f.write(json.dumps({{'argv': sys.argv[1:], 'env': env, 'cwd': os.getcwd(), 'pid': os.getpid()}}) + '\\n')
with open(calls) as f:
  run = len(f.readlines()) - 1  # 0 for the first start

def this_run(name, default):
  values = os.environ.get(name, default).split(',')
  return values[min(run, len(values) - 1)]

def on_term(*_):
  print('fake trainer: SIGTERM, checkpoint saved', flush=True)
  sys.exit(75)

signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get('FAKE_IGNORE_TERM') else on_term)
print('fake trainer started', flush=True)
time.sleep(float(this_run('FAKE_PYTHON_SLEEP', '0')))
code = int(this_run('FAKE_EXITS', '0'))
print(f'fake trainer exits {{code}}', flush=True)
if code == 137:
  os.kill(os.getpid(), signal.SIGKILL)
sys.exit(code)
"""


def alive(pid: int | None) -> bool:
  """Whether the process exists and is not a zombie (where nothing reaps orphans, they stay zombies)."""
  if not pid:
    return False
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def wait_until(predicate, timeout: float, message: str) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(message)
    time.sleep(0.02)


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
    self.workers: list[Worker] = []

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
    worker = Worker(self.tmp / f'worker{worker_id}', worker_id, self.env)
    self.workers.append(worker)
    return worker

  def kill_runs(self) -> None:
    """SIGKILL to the process group of every run a worker still has (a failed test must not leave one behind)."""
    for worker in self.workers:
      pid = worker.run_pid()
      if pid and alive(pid) and os.getpgid(pid) == pid:
        os.killpg(pid, signal.SIGKILL)


class Worker:
  """A TPU VM worker's home folder with the repo's launch/ copied to ~/lpl-jax and a fake ~/lpl-jax/.venv."""

  def __init__(self, home: Path, worker_id: int, env: dict[str, str]):
    self.home = home
    self.repo = home / 'lpl-jax'
    shutil.copytree(LAUNCH, self.repo / 'launch')
    (self.repo / '.venv' / 'bin').mkdir(parents=True)
    _executable(self.repo / '.venv' / 'bin' / 'python', FAKE_PYTHON)
    self.worker_id = worker_id
    self.env = {**env, 'HOME': str(home), 'TPU_WORKER_ID': str(worker_id)}

  def sh(self, command: str, **env: str) -> subprocess.CompletedProcess:
    """Runs an ssh --command as the worker's login shell does: `bash -c COMMAND` in the home folder."""
    return subprocess.run(
      ['bash', '-c', command], capture_output=True, text=True, cwd=self.home, env={**self.env, **env}, timeout=30
    )

  @property
  def logs(self) -> Path:
    return self.repo / 'logs'

  def log(self) -> str:
    path = self.logs / f'train-w{self.worker_id}.log'
    return path.read_text() if path.exists() else ''

  def run_pid(self) -> int | None:
    """The pid in logs/train.pid: the supervisor of the run that `train` started."""
    path = self.logs / 'train.pid'
    return int(path.read_text()) if path.exists() else None

  def worker_sh(self, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`cd lpl-jax && bash launch/worker.sh ARGS`, as tpu.sh sends it."""
    return self.sh(f'cd lpl-jax && bash launch/worker.sh {shlex.join(args)}', **env)

  def wait_for_run_end(self, timeout: float = 15.0) -> None:
    """Waits until the run's supervisor has exited."""
    wait_until(lambda: not alive(self.run_pid()), timeout, f'the run on {self.home} did not end')

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
  launch = Launch(tmp_path)
  yield launch
  launch.kill_runs()
