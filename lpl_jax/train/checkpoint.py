"""Checkpoints: the train state and the data iterator's state, saved together with orbax.

- `<directory>/<step>/` as orbax's `CheckpointManager` writes it: items `state` (the `TrainState`, its PRNG key
  stored as raw key data) and `data` (the iterator state, JSON). A state saved before the `TrainState` held its
  running loss variances (`loss_stats`) restores with them at zero.
- Saves are asynchronous (the step loop goes on while the arrays are written) and atomic: orbax writes into a
  temporary folder and renames it when complete, so a run killed mid-save leaves the previous checkpoint as the
  latest. A checkpoint that is present but unreadable (truncated files) is skipped on restore, with a one-line
  warning, in favour of the one before it.
- The writer of a run (`quarantine=True`) moves what it cannot use out of orbax's sight, into
  `<directory>/corrupt/<name>-<UTC time>/`: an unreadable checkpoint when restore skips it, and an interrupted
  save's leftovers when it opens the folder. Retention (`keep`) and later saves of the same step then never meet
  them, and nothing is deleted. Readers (sampling, evaluation, post-training's init) leave the folder alone.
- `PreemptionWatch` turns SIGTERM (a preemptible TPU VM being reclaimed) into a save at the next step boundary; with
  several processes it uses JAX's preemption sync point so that every process saves at the same step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
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


def _without_loss_stats(metadata: Any) -> bool:
  """A state saved before `TrainState` had `loss_stats` (they restore as fresh running averages, zero)."""
  tree = getattr(metadata, 'tree', metadata)
  return isinstance(tree, Mapping) and 'params' in tree and 'loss_stats' not in tree


def _zeros_like(tree: Any) -> Any:
  def zeros(x):
    value = jnp.zeros(x.shape, x.dtype)
    sharding = getattr(x, 'sharding', None)
    return jax.device_put(value, sharding) if sharding is not None else value

  return jax.tree.map(zeros, tree)


# Folders that `Checkpointer(quarantine=True)` moves aside, and where to.
QUARANTINE = 'corrupt'
_LEFTOVER = re.compile(r'^\d+\.orbax-checkpoint-tmp-.*$')


def _cause(error: BaseException, limit: int = 200) -> str:
  """An exception in one short line (TensorStore's errors carry a whole JSON spec over many lines)."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


def _is_writer() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Saves and restores `(TrainState, data iterator state)` under `directory`.

  Args:
    directory: where the step folders go (created if missing).
    save_every: save when `step % save_every == 0`, at the first save of a run, and whenever
      `save(..., force=True)`.
    keep: how many of the latest checkpoints to keep (None = all).
    async_save: write in a background thread (orbax's async checkpointing).
    quarantine: this is the run's writer: move unreadable checkpoints and interrupted saves to `corrupt/`.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_every: int,
    keep: int | None = 3,
    async_save: bool = True,
    quarantine: bool = False,
  ):
    if save_every < 1:
      raise ValueError(f'save_every={save_every}; expected >= 1.')
    self.directory = epath.Path(directory).absolute()
    self.quarantine = quarantine
    if quarantine:
      self._move_leftovers()
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every,
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=('state', 'data'), options=options)

  def _move_leftovers(self) -> None:
    """Moves an interrupted save's temporary folders aside (before orbax would delete them)."""
    if _is_writer() and self.directory.is_dir():
      for path in sorted(self.directory.iterdir()):
        if _LEFTOVER.match(path.name):
          self.set_aside(path, 'an interrupted save (a temporary folder orbax never finalised)')
    _sync('lpl_jax_checkpoint_leftovers')

  def set_aside(self, path: epath.Path, cause: str, *, into: str = QUARANTINE) -> epath.Path | None:
    """Moves `path` (a step folder or a save's leftovers) to `<directory>/<into>/<name>-<UTC time>` with one log line;
    returns the new place (process 0; None elsewhere)."""
    if not _is_writer():
      return None
    folder = self.directory / into
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f'{path.name}-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}'
    n = 1
    while target.exists():
      target, n = folder / f'{path.name}-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}.{n}', n + 1
    path.rename(target)
    log.warning('moved %s to %s: %s.', path, target, cause)
    return target

  def set_aside_step(self, step: int, cause: str, into: str = QUARANTINE) -> epath.Path | None:
    """Waits for pending saves, then moves checkpoint `step` out of orbax's sight (see `set_aside`)."""
    self._manager.wait_until_finished()
    target = self.set_aside(self.directory / str(step), cause, into=into)
    _sync(f'lpl_jax_checkpoint_set_aside_{step}')
    self._manager.reload()
    return target

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
      step: a given step, or None for the latest readable one (unreadable ones are skipped with a warning, and
        moved aside when `quarantine`).

    Returns:
      `(state, data_state, step)`, or None when there is no checkpoint (or, for the writer, none readable: all are
      moved aside).

    Raises:
      ValueError: a reader found checkpoints but could restore none of them.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    typed_key = jax.dtypes.issubdtype(target.rng.dtype, jax.dtypes.prng_key)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(target))
    for s in steps:
      try:
        older = hasattr(target, 'loss_stats') and _without_loss_stats(
          ocp.StandardCheckpointHandler().metadata(self.directory / str(s) / 'state')
        )
        fields = [f.name for f in dataclasses.fields(type(target)) if f.name != 'loss_stats']
        want = {f: getattr(abstract, f) for f in fields} if older else abstract
        out = self._manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(want), data=ocp.args.JsonRestore())
        )
        if older:
          out = dict(out, state=type(target)(**out['state'], loss_stats=_zeros_like(target.loss_stats)))
      except Exception as e:  # any unreadable checkpoint: fall back to the previous one
        if step is not None:
          raise
        if self.quarantine:
          self.set_aside(self.directory / str(s), f'checkpoint {s} cannot be restored ({_cause(e)})')
          _sync(f'lpl_jax_checkpoint_quarantine_{s}')
        else:
          log.warning('checkpoint %s/%d is unreadable (%s); trying the previous one.', self.directory, s, _cause(e))
        continue
      state = out['state']
      if typed_key:
        impl = None if isinstance(target.rng, jax.ShapeDtypeStruct) else jax.random.key_impl(target.rng)
        state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=impl))
      if s != steps[0] and self.quarantine:
        self._manager.reload()  # forget the steps moved aside
      return state, dict(out['data'] or {}), s
    if self.quarantine and steps:
      self._manager.reload()
      log.warning(
        'no checkpoint in %s could be restored (all moved to %s/): starting over.', self.directory, QUARANTINE
      )
      return None
    if steps and step is None:
      raise ValueError(f'none of the checkpoints {steps} in {self.directory} could be restored.')
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
