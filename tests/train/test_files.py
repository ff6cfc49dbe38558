"""A run's files on a local disk and on a (fake, in-memory) `gs://` alike: whole-file writes, growing files
(appended locally, rewritten whole remotely), moving a folder file by file, TensorBoard event files."""

import os

import pytest
from etils import epath

from lpl_jax.train import files
from tests.fake_gcs import fake_gcs  # noqa: F401 - a fixture


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  if request.param == 'gs':
    request.getfixturevalue('fake_gcs')
    return 'gs://bucket/run'
  return str(tmp_path / 'run')


def test_write_read_and_replace(root):
  path = os.path.join(root, 'a', 'config.json')
  assert files.read_text(path) is None
  files.write_text(path, 'one')
  files.write_text(path, 'two')
  assert files.read_text(path) == 'two'
  assert sorted(p.name for p in epath.Path(root, 'a').iterdir()) == ['config.json'], 'no temporary file left'


def test_a_growing_file_continues_and_is_complete_after_close(root):
  path = os.path.join(root, 'metrics.jsonl')
  files.write_text(path, 'row 1\n')
  f = files.GrowingFile(path, min_interval_s=3600)
  f.write(b'row 2\n')
  f.flush()
  assert files.read_text(path) == 'row 1\nrow 2\n'
  f.write(b'row 3\n')
  f.flush()
  if files.is_remote(root):  # remote flushes are rate-limited (the object is rewritten whole): not yet
    assert files.read_text(path) == 'row 1\nrow 2\n'
  f.flush(force=True)
  assert files.read_text(path) == 'row 1\nrow 2\nrow 3\n'
  f.write(b'row 4\n')
  f.close()
  assert files.read_text(path) == 'row 1\nrow 2\nrow 3\nrow 4\n'


def test_move_tree(root):
  files.write_text(os.path.join(root, 'tb', 'events.1'), 'x')
  files.write_text(os.path.join(root, 'tb', 'deep', 'events.2'), 'y')
  files.move_tree(os.path.join(root, 'tb'), os.path.join(root, 'previous', 't', 'tb'))
  assert not epath.Path(root, 'tb').exists()
  assert files.read_text(os.path.join(root, 'previous', 't', 'tb', 'deep', 'events.2')) == 'y'
  assert files.read_text(os.path.join(root, 'previous', 't', 'tb', 'events.1')) == 'x'


def test_tensorboard_events_on_the_remote_workdir(fake_gcs):  # noqa: F811
  from tensorboardX import SummaryWriter

  from tests.run.common import tensorboard_steps

  files.register_tensorboard('gs')
  writer = SummaryWriter('gs://bucket/run/tensorboard')
  for step in (1, 2, 3):
    writer.add_scalar('loss/total', 1.0 / step, step)
  writer.close()
  resumed = SummaryWriter('gs://bucket/run/tensorboard', purge_step=2)  # a run resumed from step 1
  resumed.add_scalar('loss/total', 0.7, 2)
  resumed.close()
  assert any(k.startswith('bucket/run/tensorboard/events.out.tfevents.') for k in fake_gcs)
  assert tensorboard_steps('gs://bucket/run/tensorboard') == [1, 2]
