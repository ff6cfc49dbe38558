"""Checkpoints: the train state and the data iterator's state, saved together with orbax.

- `<directory>/<step>/` as orbax's `CheckpointManager` writes it: items `state` (the `TrainState`, its PRNG key
  stored as raw key data) and `data` (the iterator state, JSON).
- Saves are asynchronous (the step loop goes on while the arrays are written) and atomic: orbax writes into a
  temporary folder and renames it when complete, so a run killed mid-save leaves the previous checkpoint as the
  latest. A checkpoint that is present but unreadable (truncated files) is skipped on restore, with a warning, in
  favour of the one before it.
- `PreemptionWatch` turns SIGTERM (a preemptible TPU VM being reclaimed) into a save at the next step boundary; with
  several processes it uses JAX's preemption sync point so that every process saves at the same step.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath

from lpl_jax.train.state import TrainState

log = logging.getLogger(__name__)


def _to_storable(state: TrainState) -> TrainState:
  """The PRNG key as raw key data (orbax stores plain arrays); works on arrays and on `jax.ShapeDtypeStruct`s."""
  if jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key):
    if isinstance(state.rng, jax.ShapeDtypeStruct):
      return state.replace(rng=jax.eval_shape(jax.random.key_data, state.rng))
    state = state.replace(rng=jax.random.key_data(state.rng))
  return state


class Checkpointer:
  """Saves and restores `(TrainState, data iterator state)` under `directory`.

  Args:
    directory: where the step folders go (created if missing).
    save_every: save when `step % save_every == 0`, at the first save of a run, and whenever
      `save(..., force=True)`.
    keep: how many of the latest checkpoints to keep (None = all).
    async_save: write in a background thread (orbax's async checkpointing).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int | None = 3, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f'save_every={save_every}; expected >= 1.')
    self.directory = epath.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every,
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=('state', 'data'), options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict | None = None, *, force: bool = False) -> bool:
    """Starts saving (returns at once when async); returns whether a save was started."""
    args = {'state': ocp.args.StandardSave(_to_storable(state))}
    args['data'] = ocp.args.JsonSave(data_state if data_state is not None else {})
    return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict, int] | None:
    """Restores into the structure, dtypes and shardings of `target` (a state, or one made of
    `jax.ShapeDtypeStruct`s with shardings).

    Args:
      step: a given step, or None for the latest readable one (unreadable ones are skipped with a warning).

    Returns:
      `(state, data_state, step)`, or None when there is no checkpoint.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    typed_key = jax.dtypes.issubdtype(target.rng.dtype, jax.dtypes.prng_key)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(target))
    for s in steps:
      try:
        out = self._manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        )
      except Exception as e:  # any unreadable checkpoint: fall back to the previous one
        if step is not None:
          raise
        log.warning(
          'checkpoint %s/%d is unreadable (%s: %s); trying the previous one.', self.directory, s, type(e).__name__, e
        )
        continue
      state = out['state']
      if typed_key:
        impl = None if isinstance(target.rng, jax.ShapeDtypeStruct) else jax.random.key_impl(target.rng)
        state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=impl))
      return state, dict(out['data'] or {}), s
    if steps and step is None:
      raise RuntimeError(f'none of the checkpoints {steps} in {self.directory} could be restored.')
    return None

  def wait(self):
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionWatch:
  """Tells the train loop when to save and stop because the machine is being reclaimed (SIGTERM)."""

  def __init__(self):
    self._flag = False
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM received: saving a checkpoint at the next step boundary, then stopping.')
    self._flag = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (all processes agree when there are several)."""
    if self._multi:
      from jax.experimental import multihost_utils

      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag

  def close(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)
