"""Checkpointer: round trip (typed PRNG key, data state), fallback past an unreadable latest checkpoint, an
interrupted save (temporary folder) is never restored, keep-K."""

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


def test_unreadable_latest_falls_back_to_the_previous_one(tmp_path, caplog):
  ckpt = Checkpointer(tmp_path, save_every=1)
  ckpt.save(1, _state(1), {'next_index': 16})
  ckpt.save(2, _state(2), {'next_index': 32})
  ckpt.close()
  # Truncate every array file of step 2 (a disk that filled up, a copy cut short).
  for root, _, files in os.walk(tmp_path / '2' / 'state'):
    for name in files:
      if 'ocdbt' in root or name.startswith('d') or root.endswith('/d'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(7)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    state, data, step = ckpt.restore(_state(0))
  assert step == 1 and data == {'next_index': 16}
  _same(state, _state(1))
  assert 'unreadable' in caplog.text
  with Checkpointer(tmp_path, save_every=1) as ckpt, pytest.raises(Exception):  # noqa: B017 - no fallback
    ckpt.restore(_state(0), step=2)  # an explicitly requested step


def test_interrupted_save_is_never_restored(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1)
  ckpt.save(1, _state(1))
  ckpt.close()
  # What a run killed mid-save leaves: orbax's temporary folder for step 2.
  partial = tmp_path / '2.orbax-checkpoint-tmp-1234'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'junk').write_bytes(b'\0' * 10)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.all_steps() == [1]
    _, _, step = ckpt.restore(_state(0))
  assert step == 1


def test_keeps_the_last_k_and_saves_on_the_interval(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
  started = [ckpt.save(s, _state(s)) for s in range(1, 8)]
  ckpt.close()
  assert started == [True, True, False, True, False, True, False]  # orbax always takes a run's first save
  with Checkpointer(tmp_path, save_every=2) as ckpt:
    assert ckpt.all_steps() == [4, 6]
  with pytest.raises(ValueError, match='save_every=0'):
    Checkpointer(tmp_path, save_every=0)
