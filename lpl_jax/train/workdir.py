"""The workdir of a run: made and checked before anything starts, and held by one trainer at a time.

- `prepare` makes the folder (local, or `gs://...` through `etils.epath`) and proves it writable with a probe file
  (permission bits say nothing to root, and an immutable folder refuses even root).
- `WorkdirLock` holds `<workdir>/lock.json`: `{host, pid, token, started, heartbeat, command}`. Locally it is made
  with `O_CREAT | O_EXCL`: of two trainers exactly one creates it. A lock already there is stale (taken over with a
  warning) when unreadable, when its host is this one and its pid is gone (or is this process but not its token: a
  restarted container), or when its heartbeat is older than `expire_s` (a dead holder on another host of a shared
  filesystem). A stale lock is removed only if unchanged since it was judged, then the create is retried once: of two
  trainers breaking the same stale lock the loser gets the holder error (but for a window of microseconds).
- Remote paths (`://`) have no exclusive create: the lock is written with a fresh token and read back a second later.
  Best-effort: it tells apart trainers started seconds apart, not a race within the storage's write latency.
- A daemon thread rewrites the heartbeat every `heartbeat_s`; if the lock has been taken over (`--force`) it logs
  once and stops, and the training goes on. Only JAX process 0 touches the file; with several processes its outcome
  is broadcast, so that all of them fail together.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lpl_jax.train.errors import WorkdirError

log = logging.getLogger(__name__)

LOCK_NAME = 'lock.json'
_SETTLE_S = 0.1  # an unreadable lock is read again after this long: it may have been created but not yet written
_RIVAL_WAIT_S = 1.0  # remote: how long a concurrent writer gets to overwrite the lock before it is read back
_TOKENS: set[str] = set()  # the tokens of the locks this process holds


def _is_remote(path: str | os.PathLike) -> bool:
  return '://' in str(path)


def _wait_for_rivals() -> None:
  time.sleep(_RIVAL_WAIT_S)


def prepare(workdir: str) -> epath.Path:
  """Makes `workdir` (and its parents) and checks that files can be written in it.

  Raises:
    WorkdirError: the path is a file, or the folder cannot be made or written.
  """
  path = epath.Path(workdir)
  try:
    if path.exists() and not path.is_dir():
      raise WorkdirError(f"workdir '{workdir}' is a file, not a folder.")
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.probe-{uuid.uuid4().hex}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir '{workdir}' is not writable: {e.strerror or e}") from e
  except ImportError as e:  # etils.epath reaches gs:// through gcsfs (fsspec) or TensorFlow, neither a dependency
    raise WorkdirError(
      f"workdir '{workdir}': this file system needs a package that is not installed ({e}); for gs:// install "
      'gcsfs (pip install gcsfs) or tensorflow.'
    ) from e
  return path


def _read(path: epath.Path, *, settle: bool = False) -> bytes | None:
  """The bytes of `path` (None if absent); with `settle`, read again a moment later if they are not a valid lock."""
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    return None
  if settle and _parse(raw) is None:
    time.sleep(_SETTLE_S)
    return _read(path)
  return raw


def _parse(raw: bytes | None) -> dict | None:
  """The lock record in `raw`; None when there is none or it is not a valid record."""
  if raw is None:
    return None
  try:
    record = json.loads(raw)
    record.update(pid=int(record['pid']), started=float(record['started']), heartbeat=float(record['heartbeat']))
    _utc(record['started'])
    ok = record['pid'] > 0 and isinstance(record['host'], str) and isinstance(record['token'], str)
  except (ValueError, KeyError, TypeError, OverflowError, OSError):
    return None
  return record if ok else None


def holder(workdir: str | os.PathLike) -> dict | None:
  """The record of the lock held on `workdir`, or None when it is unlocked or its lock file is unreadable."""
  return _parse(_read(epath.Path(workdir) / LOCK_NAME))


def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')


def _describe(record: dict | None) -> str:
  if record is None:
    return f'an unknown trainer (its {LOCK_NAME} is unreadable)'
  command, age = str(record.get('command', '')), time.time() - record['heartbeat']
  command = command if len(command) <= 120 else command[:117] + '...'
  where = f'pid {record["pid"]} on host {record["host"]}'
  return f'{where} (started {_utc(record["started"])}, heartbeat {age:.0f} s ago, command: {command})'


def _in_use(workdir: str, record: dict | None) -> WorkdirError:
  return WorkdirError(
    f"workdir '{workdir}' is in use by {_describe(record)}; two trainers in one workdir would overwrite each other's "
    'checkpoints. If that run is gone (e.g. its machine was lost), rerun with --force.'
  )


def _stale(record: dict | None, expire_s: float) -> str | None:
  """Why the holder in `record` is gone, or None when it may still be running."""
  if record is None:
    return 'its lock file is unreadable'
  if record['host'] == socket.gethostname():
    if record['pid'] == os.getpid() and record['token'] not in _TOKENS:
      return 'its pid is now this process'
    try:
      os.kill(record['pid'], 0)
    except ProcessLookupError:
      return 'its process is gone'
    except OSError:  # alive, owned by another user
      pass
  age = time.time() - record['heartbeat']
  return f'no heartbeat for {age:.0f} s' if age > expire_s else None


class WorkdirLock:
  """Holds `<workdir>/lock.json` for one run; a context manager (acquire on enter, release on exit).

  Args:
    workdir: the run's folder (local or remote), already made (see `prepare`).
    force: take the lock over even when its holder looks alive.
    heartbeat_s: how often the lock's heartbeat is rewritten.
    expire_s: a lock whose heartbeat is older than this is stale, whatever its host.
  """

  def __init__(
    self, workdir: str | os.PathLike, *, force: bool = False, heartbeat_s: float = 60.0, expire_s: float = 600.0
  ):
    self.workdir, self.path = str(workdir), epath.Path(workdir) / LOCK_NAME
    self.force, self.heartbeat_s, self.expire_s = force, heartbeat_s, expire_s
    self._record: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock (process 0 only; a no-op when already held).

    Raises:
      WorkdirError: on every process, when process 0 could not take it.
    """
    error = None
    if jax.process_index() == 0 and self._record is None:
      try:
        self._take()
      except Exception as e:  # reported to the other processes before it is raised
        error = e
    if jax.process_count() > 1:
      ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not ok and error is None:
        raise WorkdirError(f'process 0 could not take the lock of workdir {self.workdir}; see its log.')
    if error is not None:
      raise error
    return self

  def _take(self) -> None:
    now, token = time.time(), uuid.uuid4().hex
    record = dict(host=socket.gethostname(), pid=os.getpid(), token=token, started=now, heartbeat=now)
    record['command'] = ' '.join(sys.argv)
    try:
      (self._take_remote if _is_remote(self.workdir) else self._take_local)(record)
    except OSError as e:
      raise WorkdirError(f"workdir '{self.workdir}' is not writable: {e.strerror or e}") from e
    self._record = record
    _TOKENS.add(token)
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name='workdir-heartbeat', daemon=True)
    self._thread.start()

  def _judge(self, raw: bytes, *, broke: bool) -> str:
    """The warning to log on taking over the lock in `raw`; raises the holder error when it cannot be taken."""
    record = _parse(raw)
    reason = _stale(record, self.expire_s)
    if broke or (reason is None and not self.force):
      raise _in_use(self.workdir, record)
    return f"workdir '{self.workdir}': taking over the lock of {_describe(record)}: {reason or '--force'}."

  def _take_local(self, record: dict) -> None:
    takeover = None
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        raw = _read(self.path, settle=True)
        if raw is not None:
          takeover = self._judge(raw, broke=takeover is not None)
          if _read(self.path) == raw:  # leave a lock that changed since it was judged
            with contextlib.suppress(FileNotFoundError):
              os.unlink(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(json.dumps(record))
      if takeover:
        log.warning(takeover)
      return
    raise _in_use(self.workdir, _parse(_read(self.path)))

  def _take_remote(self, record: dict) -> None:
    raw = _read(self.path, settle=True)
    takeover = None if raw is None else self._judge(raw, broke=False)
    self.path.write_text(json.dumps(record))
    _wait_for_rivals()
    current = _parse(_read(self.path))
    if current is None or current['token'] != record['token']:
      raise _in_use(self.workdir, current)
    if takeover:
      log.warning(takeover)

  def _write(self, record: dict) -> None:
    """Replaces the lock file at once (locally through a temporary file, so that no reader sees half of it)."""
    tmp = self.path if _is_remote(self.workdir) else self.path.with_name(f'.{LOCK_NAME}.{record["token"]}.tmp')
    tmp.write_text(json.dumps(record))
    if tmp != self.path:
      os.replace(tmp, self.path)

  def _beat(self) -> None:
    record = self._record
    while not self._stop.wait(self.heartbeat_s):
      try:
        raw = _read(self.path)
        current = _parse(raw)
        if current is None or current['token'] != record['token']:
          who = 'nobody (it was removed)' if raw is None else _describe(current)
          log.warning("workdir '%s': its lock is now held by %s; no longer heartbeating.", self.workdir, who)
          return
        self._write(dict(record, heartbeat=time.time()))
      except Exception as e:  # a transient storage error must not stop the training
        log.warning("workdir '%s': heartbeat failed (%s: %s).", self.workdir, type(e).__name__, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this run's; idempotent."""
    if self._record is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    token, self._record, self._thread = self._record['token'], None, None
    _TOKENS.discard(token)
    current = _parse(_read(self.path))
    if current is not None and current['token'] == token:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
