"""A fake `gs://` for tests: etils.epath's fsspec backend answering from an in-memory file system that names paths
the way gcsfs does (`bucket/path`, the protocol stripped)."""

import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
  protocol = ('gs', 'gcs')
  root_marker = ''
  cachable = False  # a fresh store per test

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix) :]
    return path.strip('/')


@pytest.fixture
def fake_gcs(monkeypatch):
  """`gs://` paths read and write an in-memory store (returned: `store['bucket/path'] -> file`). Like Cloud Storage
  it has no real append or folder rename; `lpl_jax.train.files` does not rely on them."""
  gcs = FakeGCS()
  gcs.store, gcs.pseudo_dirs = {}, ['']
  monkeypatch.setattr(backend.fsspec_backend, 'fs', lambda path: gcs)
  return gcs.store
