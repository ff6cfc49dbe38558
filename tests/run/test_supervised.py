"""`launch/supervise.sh` around the real trainer: a run SIGKILLed mid-way (a crash, an OOM kill) is restarted, resumes
from its last checkpoint and finishes, with each step logged once."""

import json
import os
import signal
import subprocess

import pytest

from tests.run import common


@pytest.mark.slow
def test_the_supervisor_restarts_a_killed_run_until_it_finishes(env, tmp_path):
  workdir, pid_file = tmp_path / 'run', tmp_path / 'trainer.pid'
  train = common.main_cmd('pretrain', workdir, '--config.total_steps=6', '--config.checkpoint_every=2')
  supervisor = subprocess.Popen(
    ['bash', 'launch/supervise.sh', '--max-restarts', '3', '--pid-file', str(pid_file), '--', *train],
    cwd=common.ROOT,
    env=dict(env, LPL_RESTART_BACKOFF_S='1'),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    common.wait_for_step(supervisor, workdir, 3)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    out, _ = supervisor.communicate(timeout=900)
  finally:
    supervisor.kill()
  assert supervisor.returncode == 0, out[-3000:]
  assert 'exit 137: restarting (1/3)' in out and 'finished' in out, out[-3000:]
  assert out.count('restarting') == 1
  assert common.logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert common.checkpoint_steps(workdir)[-1] == 6
  assert json.loads((workdir / 'status.json').read_text())['state'] == 'finished'
