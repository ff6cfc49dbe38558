"""The workdir lock: one trainer per workdir, stale and forced takeovers, the heartbeat, the remote (write, then read
back) branch and the multi-process broadcast; `prepare`'s checks."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from lpl_jax.train import workdir as wd
from lpl_jax.train.errors import WorkdirError


def _plant(path, **fields):
  """Writes a lock as another trainer would; returns its record."""
  now = time.time()
  record = dict(host='other-host', pid=1234, token=uuid.uuid4().hex, started=now, heartbeat=now, command='train.py')
  record.update(fields)
  (path / 'lock.json').write_text(json.dumps(record))
  return record


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _until(condition, timeout=5.0):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.01)


@pytest.fixture
def warnings(caplog):
  caplog.set_level(logging.WARNING, logger=wd.__name__)
  return caplog


def test_acquire_refuse_release(tmp_path):
  lock = wd.WorkdirLock(tmp_path).acquire()
  try:
    record = wd.holder(tmp_path)
    assert (record['pid'], record['host']) == (os.getpid(), socket.gethostname())
    with pytest.raises(WorkdirError) as e:
      wd.WorkdirLock(tmp_path).acquire()
    message = str(e.value)
    assert str(os.getpid()) in message and socket.gethostname() in message and '--force' in message
    assert '\n' not in message
  finally:
    lock.release()
  assert not (tmp_path / 'lock.json').exists()
  lock.release()  # idempotent
  with wd.WorkdirLock(tmp_path) as held:
    assert wd.holder(tmp_path)['token'] == held._record['token']
  assert wd.holder(tmp_path) is None


def test_dead_pid_on_this_host_is_taken_over(tmp_path, warnings):
  pid = _dead_pid()
  _plant(tmp_path, host=socket.gethostname(), pid=pid)
  with wd.WorkdirLock(tmp_path):
    assert wd.holder(tmp_path)['pid'] == os.getpid()
  assert f'pid {pid}' in warnings.text and 'process is gone' in warnings.text


def test_other_host(tmp_path, warnings):
  _plant(tmp_path)
  with pytest.raises(WorkdirError, match='pid 1234 on host other-host'):
    wd.WorkdirLock(tmp_path).acquire()
  _plant(tmp_path, heartbeat=time.time() - 10_000)
  with wd.WorkdirLock(tmp_path):
    assert wd.holder(tmp_path)['pid'] == os.getpid()
  assert 'no heartbeat for' in warnings.text
  warnings.clear()
  _plant(tmp_path)
  with wd.WorkdirLock(tmp_path, force=True):
    assert wd.holder(tmp_path)['pid'] == os.getpid()
  assert 'other-host' in warnings.text and '--force' in warnings.text


def test_corrupt_lock_is_taken_over(tmp_path, warnings):
  (tmp_path / 'lock.json').write_bytes(b'\x00garbage')
  with wd.WorkdirLock(tmp_path):
    assert wd.holder(tmp_path)['pid'] == os.getpid()
  assert 'unreadable' in warnings.text


def test_heartbeat_and_takeover_by_another(tmp_path, warnings):
  lock = wd.WorkdirLock(tmp_path, heartbeat_s=0.05).acquire()
  try:
    first = wd.holder(tmp_path)['heartbeat']
    _until(lambda: wd.holder(tmp_path)['heartbeat'] > first)
    assert lock._thread.is_alive()
    write, planted = lock._write, []

    def write_then_lose(record):  # another run forces its way in right after a heartbeat
      write(record)
      if not planted:
        planted.append(_plant(tmp_path))

    lock._write = write_then_lose
    _until(lambda: not lock._thread.is_alive())
    assert wd.holder(tmp_path) == planted[0]
    assert 'no longer heartbeating' in warnings.text and 'other-host' in warnings.text
  finally:
    lock.release()
  assert wd.holder(tmp_path) == planted[0]  # not ours any more: left in place


def test_release_keeps_a_lock_taken_over(tmp_path):
  lock = wd.WorkdirLock(tmp_path).acquire()
  planted = _plant(tmp_path)
  lock.release()
  assert wd.holder(tmp_path) == planted


def test_prepare(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(WorkdirError, match="workdir '.*file' is a file, not a folder"):
    wd.prepare(str(tmp_path / 'file'))
  nested = tmp_path / 'a' / 'b' / 'run'
  assert wd.prepare(str(nested)).is_dir() and list(nested.iterdir()) == []


def _chattr(flag, path):
  return shutil.which('chattr') is not None and subprocess.run(['chattr', flag, str(path)]).returncode == 0


def test_prepare_not_writable(tmp_path):
  folder = tmp_path / 'frozen'
  folder.mkdir()
  if not _chattr('+i', folder):
    if os.geteuid() == 0:
      pytest.skip('chattr +i is not available here, and root ignores chmod')
    folder.chmod(0o555)
  try:
    for path in (folder, folder / 'run'):
      with pytest.raises(WorkdirError, match=f"workdir '{path}' is not writable: "):
        wd.prepare(str(path))
  finally:
    _chattr('-i', folder)
    folder.chmod(0o755)


def test_remote_branch(tmp_path, monkeypatch, warnings):
  monkeypatch.setattr(wd, '_is_remote', lambda path: True)
  monkeypatch.setattr(wd, '_wait_for_rivals', lambda: None)
  with wd.WorkdirLock(tmp_path, heartbeat_s=0.05) as lock:
    first = wd.holder(tmp_path)
    assert first['token'] == lock._record['token']
    _until(lambda: wd.holder(tmp_path)['heartbeat'] > first['heartbeat'])
  assert wd.holder(tmp_path) is None
  _plant(tmp_path)
  with pytest.raises(WorkdirError, match='other-host'):
    wd.WorkdirLock(tmp_path).acquire()
  _plant(tmp_path, heartbeat=time.time() - 10_000)
  with wd.WorkdirLock(tmp_path):
    pass
  assert 'no heartbeat for' in warnings.text
  monkeypatch.setattr(wd, '_wait_for_rivals', lambda: _plant(tmp_path, host='rival'))  # a writer right after ours
  lock = wd.WorkdirLock(tmp_path)
  with pytest.raises(WorkdirError, match='on host rival'):
    lock.acquire()
  assert lock._thread is None and wd.holder(tmp_path)['host'] == 'rival'


def test_multiprocess_broadcast(tmp_path, monkeypatch):
  sent = []

  def broadcast(x, ok=True):
    sent.append(int(x))
    return np.int32(ok)

  monkeypatch.setattr(wd.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(wd.multihost_utils, 'broadcast_one_to_all', broadcast)
  _plant(tmp_path)
  with pytest.raises(WorkdirError, match='other-host'):  # process 0: its own, detailed error
    wd.WorkdirLock(tmp_path).acquire()
  assert sent == [0]
  monkeypatch.setattr(wd.jax, 'process_index', lambda: 1)
  wd.WorkdirLock(tmp_path).acquire().release()  # process 0 succeeded: nothing to do here
  monkeypatch.setattr(wd.multihost_utils, 'broadcast_one_to_all', lambda x: broadcast(x, ok=False))
  with pytest.raises(WorkdirError, match=f'process 0 could not take the lock of workdir {tmp_path}'):
    wd.WorkdirLock(tmp_path).acquire()
  assert sent == [0, 1, 1] and wd.holder(tmp_path)['host'] == 'other-host'


def test_a_gs_workdir_without_a_cloud_storage_package_names_what_to_install(monkeypatch):
  from etils.epath import backend

  def missing(path):
    raise ImportError('Please install gcsfs to access Google Storage')

  monkeypatch.setattr(backend.fsspec_backend, 'fs', missing)
  with pytest.raises(WorkdirError, match=r"workdir 'gs://bucket/run': .* install gcsfs \(pip install gcsfs\)"):
    wd.prepare('gs://bucket/run')
