"""A `gs://` workdir (a fake, in-memory Cloud Storage): the metrics, TensorBoard events, sample grids, config, status
and lock of a run land there, nowhere on the local disk, and a resumed run reads its history back from there."""

import json
import os

import pytest
from etils import epath

from lpl_jax.train import checkpoint, loop
from lpl_jax.train.metrics import logged_steps
from tests.fake_gcs import fake_gcs  # noqa: F401 - a fixture
from tests.run import common

RUN = 'gs://bucket/run'


@pytest.mark.slow
def test_a_gs_workdir_holds_the_whole_run_and_a_resume_reads_it_back(
  fake_gcs,  # noqa: F811
  tmp_path,
  monkeypatch,
  compilation_cache,  # the resume loads what the first run compiled (or the CLI tests' runs of the same config)
):
  # Orbax writes checkpoints through TensorStore's own GCS driver, which the fake cannot serve: checkpoints of
  # gs://bucket go to a local folder; everything else goes through the fake.
  local = tmp_path / 'bucket'

  def checkpointer(directory, **kwargs):
    return checkpoint.Checkpointer(str(directory).replace('gs://bucket', str(local)), **kwargs)

  monkeypatch.setattr(loop, 'Checkpointer', checkpointer)
  monkeypatch.chdir(tmp_path / '..')
  before = set(os.listdir('.'))
  settings = common.LOOP_SETTINGS
  first = loop.train_and_evaluate(common.experiment('demo_cpu.py', 'pretrain', total_steps=2, **settings), RUN)
  assert first.finished and logged_steps(RUN) == [1, 2]
  # What a run killed after logging step 3 (checkpoint 2 the newest) leaves in the bucket.
  metrics = epath.Path(RUN, 'metrics.jsonl')
  metrics.write_text(metrics.read_text() + json.dumps({'step': 3, 'loss/total': 9.0}) + '\n')

  second = loop.train_and_evaluate(common.experiment('demo_cpu.py', 'pretrain', total_steps=4, **settings), RUN)
  assert second.finished and second.step == 4
  assert logged_steps(RUN) == [1, 2, 3, 4], 'the orphan row 3 was dropped on resume, then logged again'
  assert all(json.loads(line)['loss/total'] < 9 for line in metrics.read_text().splitlines())
  assert common.tensorboard_steps(f'{RUN}/tensorboard') == [1, 2, 3, 4]
  names = sorted(fake_gcs)
  for name in ('config.json', 'status.json', 'samples/00000002.png', 'samples/00000004.png', 'metrics.jsonl'):
    assert f'bucket/run/{name}' in names, (name, names)
  assert json.loads(epath.Path(RUN, 'status.json').read_text())['state'] == 'finished'
  assert json.loads(epath.Path(RUN, 'config.json').read_text())['total_steps'] == 4
  assert 'bucket/run/lock.json' not in names, 'released'
  assert epath.Path(RUN, 'samples', '00000004.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert common.checkpoint_steps(local / 'run') == [2, 4]
  assert set(os.listdir('.')) == before, 'nothing written to the local disk besides the checkpoints'
