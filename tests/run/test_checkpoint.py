"""Checkpointer: round trip (typed PRNG key, data state), fallback past an unreadable latest checkpoint (moved aside
by the run's writer, left alone by readers), an interrupted save (temporary folder) is never restored and is moved
aside by the writer, keep-K."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpl_jax import train
from lpl_jax.train.checkpoint import Checkpointer


def _state(seed):
  params = {'w': jax.random.normal(jax.random.key(seed), (4, 3)), 'b': jnp.full((3,), float(seed))}
  return train.create_state(params, optax.adam(1e-3), jax.random.key(seed + 100))


def _same(a, b):
  for x, y in zip(
    jax.tree.leaves(jax.random.key_data(a.rng)), jax.tree.leaves(jax.random.key_data(b.rng)), strict=True
  ):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(a.replace(rng=0)), jax.tree.leaves(b.replace(rng=0)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_data_state(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1)
  ckpt.save(3, _state(1), {'next_index': 48})
  ckpt.close()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    state, data, step = ckpt.restore(_state(0))
  assert step == 3 and data == {'next_index': 48}
  assert jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
  _same(state, _state(1))


def test_no_checkpoint_gives_none(tmp_path):
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.restore(_state(0)) is None


def _truncate(folder):
  """Truncates every array file of a checkpoint (a disk that filled up, a copy cut short)."""
  for root, _, files in os.walk(folder / 'state'):
    for name in files:
      if 'ocdbt' in root or name.startswith('d') or root.endswith('/d'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(7)


def _saved(tmp_path, *steps):
  ckpt = Checkpointer(tmp_path, save_every=1)
  for s in steps:
    ckpt.save(s, _state(s), {'next_index': 16 * s})
  ckpt.close()


def test_unreadable_latest_falls_back_to_the_previous_one(tmp_path, caplog):
  _saved(tmp_path, 1, 2)
  _truncate(tmp_path / '2')
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    state, data, step = ckpt.restore(_state(0))
  assert step == 1 and data == {'next_index': 16}
  _same(state, _state(1))
  (warning,) = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert '\n' not in warning and len(warning) < 400, warning  # one line, not TensorStore's whole spec
  assert sorted(os.listdir(tmp_path)) == ['1', '2'], 'a reader moves nothing'
  with Checkpointer(tmp_path, save_every=1) as ckpt, pytest.raises(Exception):  # noqa: B017 - no fallback
    ckpt.restore(_state(0), step=2)  # an explicitly requested step


def test_the_writer_quarantines_an_unreadable_checkpoint_then_saves_that_step_again(tmp_path, caplog):
  _saved(tmp_path, 1, 2, 3)
  _truncate(tmp_path / '3')
  with Checkpointer(tmp_path, save_every=1, keep=2, quarantine=True) as ckpt:
    _, _, step = ckpt.restore(_state(0))
    assert step == 2 and ckpt.all_steps() == [1, 2]
    (moved,) = os.listdir(tmp_path / 'corrupt')
    assert moved.startswith('3-')
    assert ckpt.save(3, _state(30), force=True)  # the step that was corrupt: no StepAlreadyExistsError
    ckpt.save(4, _state(4), force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4], 'retention counts good checkpoints only'
  assert sorted(os.listdir(tmp_path)) == ['3', '4', 'corrupt']
  assert os.listdir(tmp_path / 'corrupt') == [moved], 'retention never touches the quarantine'
  (line,) = [r.getMessage() for r in caplog.records if 'corrupt' in r.getMessage()]
  assert 'checkpoint 3 cannot be restored' in line and '\n' not in line
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    state, _, step = ckpt.restore(_state(0))
  assert step == 4
  _same(state, _state(4))


def test_the_writer_moves_aside_what_cannot_be_restored_and_then_starts_over(tmp_path):
  _saved(tmp_path, 1)
  _truncate(tmp_path / '1')
  with Checkpointer(tmp_path, save_every=1, quarantine=True) as ckpt:
    assert ckpt.restore(_state(0)) is None
    assert ckpt.all_steps() == []
  assert os.listdir(tmp_path) == ['corrupt']


@pytest.mark.parametrize('writer', [False, True])
def test_interrupted_save_is_never_restored_and_the_writer_moves_it_aside(tmp_path, writer):
  _saved(tmp_path, 1)
  # What a run killed mid-save leaves: orbax's temporary folder for step 2.
  partial = tmp_path / '2.orbax-checkpoint-tmp-1234'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'junk').write_bytes(b'\0' * 10)
  with Checkpointer(tmp_path, save_every=1, quarantine=writer) as ckpt:
    assert ckpt.all_steps() == [1]
    _, _, step = ckpt.restore(_state(0))
    assert step == 1
    if writer:
      assert ckpt.save(2, _state(2), force=True)
  if writer:
    (moved,) = os.listdir(tmp_path / 'corrupt')
    assert moved.startswith('2.orbax-checkpoint-tmp-1234-')
    assert (tmp_path / 'corrupt' / moved / 'state' / 'junk').exists()


def test_keeps_the_last_k_and_saves_on_the_interval(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
  started = [ckpt.save(s, _state(s)) for s in range(1, 8)]
  ckpt.close()
  assert started == [True, True, False, True, False, True, False]  # orbax always takes a run's first save
  with Checkpointer(tmp_path, save_every=2) as ckpt:
    assert ckpt.all_steps() == [4, 6]
  with pytest.raises(ValueError, match='save_every=0'):
    Checkpointer(tmp_path, save_every=0)


def test_a_state_saved_without_loss_stats_restores_with_them_at_zero(tmp_path):
  """Checkpoints written before the train state held its running loss variances restore (the variances start at 0),
  and the run's next save holds them."""
  import orbax.checkpoint as ocp

  old = _state(5)
  fields = {
    'step': old.step,
    'params': old.params,
    'opt_state': old.opt_state,
    'ema_params': old.ema_params,
    'rng': jax.random.key_data(old.rng),
  }
  manager = ocp.CheckpointManager(tmp_path, item_names=('state', 'data'))
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(fields), data=ocp.args.JsonSave({'n': 1})))
  manager.wait_until_finished()
  manager.close()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    state, data, step = ckpt.restore(
      _state(0).replace(loss_stats={'diffusion_var': jnp.float32(1), 'lpl_var': jnp.float32(2)})
    )
  assert step == 7 and data == {'n': 1}
  _same(state, old)
  assert jax.tree.map(float, state.loss_stats) == {'diffusion_var': 0.0, 'lpl_var': 0.0}
