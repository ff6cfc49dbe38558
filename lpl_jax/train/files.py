"""A run's files on any file system: a local folder and a `gs://` workdir alike, through `etils.epath`.

Object stores have neither append nor rename of folders, and an object appears only when its upload completes:
- `write_bytes` / `write_text` replace a whole file at once (locally through a temporary file and a rename, so a
  reader never sees half of it);
- `GrowingFile` is a file written by appending (`metrics.jsonl`, TensorBoard event files): on a local disk it is
  appended to and flushed; on an object store its content is kept in memory and the whole object rewritten when it
  is flushed (at most every `min_interval_s`, and always on close), which is what TensorBoard's own GCS writer does;
- `move_tree` moves a folder file by file.
TensorBoard's event files go through `GrowingFile` for remote paths (`register_tensorboard`).
"""

from __future__ import annotations

import io
import os
import time
import uuid

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  return '://' in os.fspath(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces `path` with `data` at once (its folder is created)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    target.write_bytes(data)
    return
  tmp = target.with_name(f'.{target.name}.{uuid.uuid4().hex[:8]}.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def read_text(path: str | os.PathLike) -> str | None:
  """The text of `path`, or None when it does not exist."""
  target = epath.Path(path)
  return target.read_text() if target.exists() else None


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or a folder (file by file, as object stores have no folder rename) to `dst`."""
  src, dst = epath.Path(src), epath.Path(dst)
  if not is_remote(src):
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    return
  if not src.is_dir():
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    return
  for path in sorted(src.iterdir()):
    move_tree(path, dst / path.name)
  src.rmtree(missing_ok=True)


class GrowingFile:
  """A binary file written by appending; see the module docstring.

  Args:
    path: the file (its folder is created); an existing file is continued.
    min_interval_s: remote only: flushes closer together than this are deferred (close always writes).
  """

  def __init__(self, path: str | os.PathLike, *, min_interval_s: float = 30.0):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._remote, self._interval = is_remote(path), min_interval_s
    self._last, self._dirty = 0.0, False
    if self._remote:
      self._buffer = io.BytesIO()
      if self.path.exists():
        self._buffer.write(self.path.read_bytes())
    else:
      self._file = open(self.path, 'ab')  # closed in close()

  def write(self, data: bytes) -> None:
    if self._remote:
      self._buffer.write(data)
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self, *, force: bool = False) -> None:
    if not self._remote:
      self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._last >= self._interval):
      self.path.write_bytes(self._buffer.getvalue())
      self._last, self._dirty = time.monotonic(), False

  def close(self) -> None:
    if self._remote:
      self.flush(force=True)
    else:
      self._file.close()


class _TensorBoardFactory:
  """tensorboardX's writer factory for remote event files (its registry is keyed by the path's scheme)."""

  def open(self, path: str) -> GrowingFile:
    return GrowingFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard(scheme: str) -> None:
  """Makes tensorboardX write event files under `<scheme>://` through epath (replacing its own GCS writer, which
  needs the google-cloud-storage package)."""
  from tensorboardX import record_writer

  record_writer.register_writer_factory(scheme, _TensorBoardFactory())
