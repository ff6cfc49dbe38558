"""The loop's reporting on the host: the divergence guard, the history cut at a resumed run's step (and moved aside
on a fresh start), the stops on non-finite metrics."""

import json
import math
import os

import numpy as np
import pytest

from lpl_jax.train import metrics as metrics_lib
from lpl_jax.train.errors import DivergenceGuardError, NonFiniteLossError


def _feed(guard, losses, start=1):
  for i, loss in enumerate(losses):
    guard.check(start + i, {'loss/diffusion': loss, 'loss/total': loss, 'grad_norm': 1.0})


def test_the_spike_guard_judges_against_the_median_of_the_previous_window():
  guard = metrics_lib.Guard(loss_spike=3.0, window=4)
  _feed(guard, [100.0, 1.0, 1.2])  # fewer than `window` steps: nothing is judged yet, not even 100
  # Steps 5-7 are judged against the medians 1.1, 1.1 and 1.15 of their previous four: all under 3x.
  _feed(guard, [0.9, 2.0, 1.1, 3.4], start=4)
  with pytest.raises(DivergenceGuardError) as e:
    _feed(guard, [5.0], start=8)
  window = [0.9, 2.0, 1.1, 3.4]
  assert 5.0 > 3 * np.median(window) and np.median(window) == pytest.approx(1.55)
  assert e.value.step == 8 and e.value.terms == {'loss/diffusion': 5.0}
  assert str(e.value).startswith('step 8: loss/diffusion = 5 is 3.23 x the median 1.55 of the previous 4 steps')
  assert 'stopping without saving this step' in str(e.value)


def test_the_spike_guard_watches_the_diffusion_loss_not_the_total():
  guard = metrics_lib.Guard(loss_spike=2.0, window=2)
  for step, total in enumerate([1.0, 1.0, 5.0, 5.0], start=1):  # LPL switching on quintuples the total
    guard.check(step, {'loss/diffusion': 1.0, 'loss/total': total, 'grad_norm': 1.0})


def test_the_gradient_norm_guard():
  guard = metrics_lib.Guard(max_grad_norm=10.0)
  guard.check(1, {'loss/diffusion': 1.0, 'grad_norm': 10.0})
  with pytest.raises(DivergenceGuardError, match=r'step 2: grad_norm = 10\.5 is over guard.max_grad_norm = 10'):
    guard.check(2, {'loss/diffusion': 1.0, 'grad_norm': 10.5})


def test_the_logger_stops_on_a_non_finite_term_and_on_the_guard(tmp_path):
  logger = metrics_lib.MetricLogger(
    str(tmp_path), start=0, total=10, progress=False, guard=metrics_lib.Guard(max_grad_norm=5.0)
  )
  try:
    logger.record(1, {'loss/total': np.float32(1.0), 'loss/diffusion': 1.0, 'grad_norm': 1.0}, write=True)
    assert logger.recorded == (1, {'loss/total': 1.0, 'loss/diffusion': 1.0, 'grad_norm': 1.0})
    with pytest.raises(NonFiniteLossError) as e:
      logger.record(2, {'loss/total': np.float32('nan'), 'loss/diffusion': 1.0, 'grad_norm': 1.0}, write=False)
    assert e.value.step == 2 and math.isnan(e.value.terms['loss/total'])
    with pytest.raises(DivergenceGuardError):
      logger.record(3, {'loss/total': 1.0, 'loss/diffusion': 1.0, 'grad_norm': 6.0}, write=True)
  finally:
    logger.close()
  assert metrics_lib.logged_steps(str(tmp_path)) == [1]


def _history(workdir, steps):
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps({'step': s, 'loss/total': 1.0}) + '\n' for s in steps)
  (workdir / 'samples').mkdir()
  (workdir / 'samples' / '00000005.png').write_bytes(b'png')


def test_a_resumed_run_drops_the_rows_after_its_step(tmp_path):
  _history(tmp_path, [1, 2, 3, 4, 5])
  assert metrics_lib.open_history(str(tmp_path), 3, resumed=True) == 4  # TensorBoard purges from step 4 on
  assert metrics_lib.logged_steps(str(tmp_path)) == [1, 2, 3]
  assert os.path.exists(tmp_path / 'samples' / '00000005.png'), 'grids are rewritten when their step comes again'


def test_a_fresh_start_moves_the_old_history_aside(tmp_path, caplog):
  _history(tmp_path, [1, 2, 3])
  (tmp_path / 'tensorboard').mkdir()
  assert metrics_lib.open_history(str(tmp_path), 0, resumed=False) is None
  assert sorted(os.listdir(tmp_path)) == ['previous']
  (previous,) = os.listdir(tmp_path / 'previous')
  assert sorted(os.listdir(tmp_path / 'previous' / previous)) == ['metrics.jsonl', 'samples', 'tensorboard']
  assert metrics_lib.logged_steps(str(tmp_path / 'previous' / previous)) == [1, 2, 3]
  assert 'starting a new one at step 0' in caplog.text
  caplog.clear()
  assert metrics_lib.open_history(str(tmp_path), 0, resumed=False) is None  # nothing to move: nothing said
  assert 'starting a new one' not in caplog.text
