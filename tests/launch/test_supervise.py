"""launch/supervise.sh and `worker.sh train/stop/status` on a fake worker: restarts by exit status, stop and
stop --force, the cleanup of stale accelerator holders, the log copied into the workdir. No JAX: the trainer is the
fake `.venv/bin/python` of conftest.py, told by $FAKE_EXITS and $FAKE_PYTHON_SLEEP what to do at each start."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.launch.conftest import LAUNCH, alive, wait_until

FAST = {'LPL_RESTART_BACKOFF_S': '0.05', 'LPL_LOG_SYNC_S': '300'}


def train(worker, *flags: str, workdir: str = 'gs://b/run', **env: str) -> subprocess.CompletedProcess:
  result = worker.worker_sh('train', *flags, '--', '--config=c.py', f'--workdir={workdir}', **{**FAST, **env})
  assert result.returncode == 0, result.stderr
  return result


def restarts(log: str) -> list[str]:
  return [line.split('supervise: ', 1)[1] for line in log.splitlines() if ': restarting (' in line]


def test_supervise_sh_restarts_a_crash_twice_then_stops_when_finished(tmp_path):
  """The supervisor alone, in the foreground, with a trainer that crashes (1), is killed (137), then finishes."""
  counter = tmp_path / 'starts'
  trainer = tmp_path / 'trainer.py'
  trainer.write_text(
    'import os, pathlib, signal, sys\n'
    f'counter = pathlib.Path({str(counter)!r})\n'
    'n = int(counter.read_text()) if counter.exists() else 0\n'
    'counter.write_text(str(n + 1))\n'
    'code = [1, 137, 0][n]\n'
    'if code == 137:\n'
    '  os.kill(os.getpid(), signal.SIGKILL)\n'
    'sys.exit(code)\n'
  )
  result = subprocess.run(
    ['bash', str(LAUNCH / 'supervise.sh'), '--', sys.executable, str(trainer)],
    capture_output=True,
    text=True,
    env={**os.environ, **FAST},
    timeout=30,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert counter.read_text() == '3'
  assert restarts(result.stdout) == ['exit 1: restarting (1/100) in 0.05s', 'exit 137: restarting (2/100) in 0.05s']
  assert result.stdout.splitlines()[-1].endswith('supervise: finished (exit 0)')


def test_train_watch_restarts_crashes_until_finished(launch):
  worker = launch.worker(0)
  started = train(worker, '--watch', FAKE_EXITS='1,137,0').stdout
  assert f'worker 0: started pid {worker.run_pid()} ' in started and 'restarts after a crash: 100' in started
  worker.wait_for_run_end()
  records = worker.trainer_calls(3)
  assert [r['argv'] for r in records] == [['-m', 'lpl_jax.main', '--config=c.py', '--workdir=gs://b/run']] * 3
  log = worker.log()
  assert restarts(log) == ['exit 1: restarting (1/100) in 0.05s', 'exit 137: restarting (2/100) in 0.05s']
  assert 'supervise: finished (exit 0)' in log
  assert int((worker.logs / 'trainer.pid').read_text()) == records[-1]['pid']
  assert 'worker 0: not running' in worker.worker_sh('status').stdout


@pytest.mark.parametrize(
  'flags, exits, starts, last',
  [
    (['--watch'], '2', 1, 'input error, not restarting (exit 2)'),
    (['--watch', '--max-restarts', '2'], '1', 3, 'exit 1: giving up after 2 restarts (--max-restarts 2)'),
    ([], '1', 1, "exit 1: not restarting (restarts are off; 'train --watch' restarts)"),
    ([], '0', 1, 'finished (exit 0)'),
  ],
)
def test_what_is_not_restarted(launch, flags, exits, starts, last):
  worker = launch.worker(0)
  train(worker, *flags, FAKE_EXITS=exits)
  worker.wait_for_run_end()
  time.sleep(0.2)  # four backoffs: a restart would have started by now
  assert len(worker.trainer_calls()) == starts
  assert worker.log().rstrip().splitlines()[-1].endswith(f'supervise: {last}')


def test_stop_ends_a_supervised_run_without_a_restart(launch):
  worker = launch.worker(0)
  train(worker, '--watch', FAKE_PYTHON_SLEEP='60')
  [record] = worker.trainer_calls()
  supervisor = worker.run_pid()
  assert f'running (pid {supervisor}, trainer pid {record["pid"]})' in worker.worker_sh('status').stdout
  stopped = worker.worker_sh('stop', '--timeout', '10')
  assert stopped.returncode == 0, stopped.stderr
  assert f'sent SIGTERM to pid {supervisor}' in stopped.stdout and 'worker 0: stopped' in stopped.stdout
  assert not alive(record['pid']) and not alive(supervisor)
  time.sleep(0.2)
  assert len(worker.trainer_calls()) == 1
  log = worker.log()
  assert 'fake trainer: SIGTERM, checkpoint saved' in log and 'supervise: stop requested' in log
  assert log.rstrip().endswith('supervise: stopped (exit 75: checkpoint saved)')
  assert 'not running' in worker.worker_sh('stop').stdout


def test_stop_during_the_backoff_ends_the_wait(launch):
  """The stop lands while the log is being copied, after the restart is announced but before the backoff's sleep
  starts: the sleep that follows must still be cut short."""
  worker = launch.worker(0)
  train(worker, '--watch', FAKE_EXITS='1', LPL_RESTART_BACKOFF_S='60', FAKE_CP_SLEEP='1')
  wait_until(lambda: 'restarting (1/100) in 60s' in worker.log(), 10, 'no restart announced')
  assert 'worker 0: running (pid ' in worker.worker_sh('status').stdout  # between two trainers
  started = time.monotonic()
  stopped = worker.worker_sh('stop', '--timeout', '10')
  assert stopped.returncode == 0 and 'worker 0: stopped' in stopped.stdout
  assert time.monotonic() - started < 10  # two log copies of 1 s each at most, far below the 60 s backoff
  assert worker.log().rstrip().endswith('supervise: stopped while waiting to restart')
  assert len(worker.trainer_calls()) == 1


def test_sigterm_from_elsewhere_is_restarted(launch):
  """A maintenance event (autocheckpoint) sends SIGTERM to the trainer, not to the supervisor: exit 75, restart."""
  worker = launch.worker(0)
  train(worker, '--watch', FAKE_PYTHON_SLEEP='60,0')
  [first] = worker.trainer_calls()
  os.kill(first['pid'], signal.SIGTERM)
  worker.wait_for_run_end()
  assert len(worker.trainer_calls()) == 2
  log = worker.log()
  assert 'exit 75 (SIGTERM from outside this supervisor, e.g. a maintenance event): restarting (1/100)' in log
  assert 'supervise: finished (exit 0)' in log


def test_stop_force_kills_a_trainer_that_ignores_sigterm(launch):
  worker = launch.worker(0)
  train(worker, '--watch', FAKE_PYTHON_SLEEP='60', FAKE_IGNORE_TERM='1')
  [record] = worker.trainer_calls()
  supervisor = worker.run_pid()
  polite = worker.worker_sh('stop', '--timeout', '1')
  assert polite.returncode == 1 and 'still running after 1s (stop --force kills it)' in polite.stderr
  assert alive(record['pid']) and alive(supervisor)
  forced = worker.worker_sh('stop', '--timeout', '1', '--force')
  assert forced.returncode == 0, forced.stderr
  assert 'SIGKILL to the run' in forced.stdout and 'worker 0: killed' in forced.stdout
  assert not alive(record['pid']) and not alive(supervisor)
  assert len(worker.trainer_calls()) == 1


def test_a_second_train_is_refused_while_a_run_is_alive(launch):
  worker = launch.worker(0)
  train(worker, '--watch', FAKE_PYTHON_SLEEP='60')
  worker.trainer_calls()
  again = worker.worker_sh('train', '--', '--workdir=gs://b/run')
  assert again.returncode == 2 and 'already running' in again.stderr


@pytest.fixture
def holder(tmp_path, request):
  """A sleeping process that holds a fake accelerator device file open (as a crashed trainer holds /dev/accel0);
  with the parameter 'deaf' it ignores SIGTERM."""
  device = tmp_path / 'accel0'
  device.write_text('')
  deaf = getattr(request, 'param', '') == 'deaf'
  with open(device) as f:  # the test's own copy closes at once: only the sleeper holds it
    process = subprocess.Popen(
      ['sleep', '60'], stdin=f, preexec_fn=(lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)) if deaf else None
    )
  yield device, process
  process.kill()
  process.wait()


# What worker.sh's train needs on PATH, besides the tool that finds the processes holding a file.
TOOLS = ('bash', 'cat', 'cut', 'date', 'dirname', 'env', 'grep', 'mkdir', 'nohup', 'ps', 'rm', 'setsid', 'sleep')
TOOLS += ('sort', 'tail', 'tr', 'gcloud')


def path_with(launch, *tools: str) -> str:
  """A PATH with only TOOLS and `tools` (to try lsof, fuser, or neither)."""
  folder = launch.tmp / f'tools-{"-".join(tools) or "none"}'
  folder.mkdir()
  for tool in TOOLS + tools:
    os.symlink(shutil.which(tool, path=launch.env['PATH']), folder / tool)
  return str(folder)


@pytest.mark.parametrize('finder', ['lsof', 'fuser'])
def test_stale_accelerator_holders_are_killed_before_training(launch, holder, finder):
  if not shutil.which(finder):
    pytest.skip(f'{finder} is not installed')
  device, process = holder
  worker = launch.worker(0)
  env = {'LPL_ACCEL_DEVICES': f'{device.parent}/accel* {device.parent}/vfio/*', 'PATH': path_with(launch, finder)}
  skipped = train(worker, '--no-cleanup', FAKE_EXITS='0', **env)
  assert 'stale process' not in skipped.stdout + skipped.stderr and process.poll() is None
  worker.wait_for_run_end()
  started = train(worker, FAKE_EXITS='0', LPL_CLEANUP_GRACE_S='2', **env)
  lines = [line for line in started.stdout.splitlines() if 'stale process' in line]
  assert len(lines) == 1 and f'killed stale process {process.pid} that held the accelerator (SIGTERM)' in lines[0]
  assert process.wait(timeout=5) == -signal.SIGTERM
  assert 'started pid' in started.stdout  # and training went on
  worker.wait_for_run_end()


@pytest.mark.parametrize('holder', ['deaf'], indirect=True)
def test_a_stale_holder_that_ignores_sigterm_gets_sigkill(launch, holder):
  device, process = holder
  worker = launch.worker(0)
  started = train(worker, FAKE_EXITS='0', LPL_ACCEL_DEVICES=str(device), LPL_CLEANUP_GRACE_S='1')
  assert f'killed stale process {process.pid} that held the accelerator (SIGKILL after 1s)' in started.stdout
  assert process.wait(timeout=5) == -signal.SIGKILL
  worker.wait_for_run_end()


def test_cleanup_says_so_when_it_cannot_look(launch, holder):
  device, process = holder
  worker = launch.worker(0)
  started = train(worker, FAKE_EXITS='0', LPL_ACCEL_DEVICES=str(device), PATH=path_with(launch))
  assert f'neither lsof nor fuser is installed: not looking for stale processes on {device}' in started.stderr
  assert process.poll() is None
  worker.wait_for_run_end()


def cp_calls(launch) -> list[list[str]]:
  return [call for call in launch.calls() if call[1:3] == ['storage', 'cp']]


def test_the_log_is_copied_to_a_gs_workdir_while_it_runs_and_after_each_exit(launch):
  worker = launch.worker(0)
  log = str(worker.logs / 'train-w0.log')
  train(worker, '--watch', FAKE_EXITS='1,0', FAKE_PYTHON_SLEEP='0.6,0', LPL_LOG_SYNC_S='0.2')
  worker.wait_for_run_end()
  calls = cp_calls(launch)
  assert all(call == ['gcloud', 'storage', 'cp', log, 'gs://b/run/logs/train-w0.log'] for call in calls)
  assert len(calls) >= 4  # one after each of the two exits, one at the end, and periodic ones meanwhile


def test_a_failed_copy_is_one_line_in_the_log(launch):
  worker = launch.worker(0)
  train(worker, '--watch', FAKE_EXITS='0', FAKE_CP_RC='1')
  worker.wait_for_run_end()
  log = worker.log()
  assert 'supervise: copying the log to gs://b/run/logs/train-w0.log failed' in log
  assert 'supervise: finished (exit 0)' in log


def test_the_log_is_copied_to_a_local_workdir(launch):
  worker = launch.worker(0)
  result = worker.worker_sh('train', '--', '--config=c.py', '--workdir', 'runs/x y/', **FAST)
  assert result.returncode == 0, result.stderr
  worker.wait_for_run_end()
  copy = worker.repo / 'runs' / 'x y' / 'logs' / 'train-w0.log'
  assert copy.read_text() == worker.log()
  assert cp_calls(launch) == []


def test_no_workdir_no_copy_and_logs_elsewhere(launch, tmp_path):
  worker = launch.worker(0)
  logs = tmp_path / 'elsewhere'
  result = worker.worker_sh('train', '--', '--config=c.py', LPL_LOG_DIR=str(logs), **FAST)
  assert result.returncode == 0, result.stderr
  wait_until(lambda: 'supervise: finished' in (logs / 'train-w0.log').read_text(), 10, 'no finished line')
  assert not (worker.logs).exists() and (logs / 'train.pid').exists()
  assert cp_calls(launch) == []


def test_status_without_a_venv_says_not_set_up(launch):
  worker = launch.worker(0)
  shutil.rmtree(worker.repo / '.venv')
  out = worker.worker_sh('status')
  assert out.returncode == 0 and 'worker 0: not set up' in out.stdout


@pytest.mark.parametrize(
  'args, message',
  [
    (['train', '--max-restarts', '3', '--', '--workdir=w'], '--max-restarts needs --watch'),
    (['train', '--watch', '--max-restarts', 'x', '--', '--workdir=w'], 'expected a whole number'),
    (['stop', '--timeout', 'soon'], 'expected whole seconds'),
  ],
)
def test_worker_bad_usage(launch, args, message):
  result = launch.worker(0).worker_sh(*args)
  assert result.returncode == 2 and message in result.stderr
