"""Evaluation inside the training loop: every `eval.every` steps and at the end, `eval.num_images` samples of the EMA
params against a reference file (`python -m lpl_jax.evaluate --write_reference`), and the best evaluation's EMA
params kept as their own checkpoint.

- Samples come from the run's compiled sampler (`Run.generate_fn`, the one the sample grids use; the `sample`
  section's sampler, steps and guidance), `eval.batch_size` rows per call (0: `data.global_batch`) sharded over every
  device of every process. The conditions are `build.sample_conditions` (classes 0, 1, 2, ... or the source's first
  text embeddings) and the noise comes from `fold_in(key(seed), EVAL_STREAM)`, a key of its own: every evaluation
  sees the same noise (the differences between evaluations are the params'), and the training keys, state and data
  iterator are never touched (nothing is donated).
- Features are extracted on the devices, from the sampled batch as it is, by the extractor the reference names
  (`eval.features`: Inception from `eval.inception_weights`, checked against the reference's fingerprint, or the
  small-domain CNN whose params the reference holds); only `[B, D]` features come to the host, gathered from every
  process (`sharding.to_host`). The sampler and the extractor compile once per run.
- Metrics (`reference.compare`): `eval/fid` (Inception) or `eval/fd_small_domain` (NOT Inception-FID), then
  `eval/precision`, `eval/recall`, `eval/density`, `eval/coverage`, and `eval/seconds`. Every process computes them
  from the same features and takes process 0's values bit for bit; process 0 writes them as a row of their own in
  `metrics.jsonl` (`{"step": s, "eval/...": ...}`) and to TensorBoard, like any row of step s: a resumed run keeps
  it when s is at or before the step it resumes from and drops it otherwise (then step s is evaluated again).
- `eval.keep_best`: `<workdir>/checkpoints/best/<step>/` holds the EMA params of the evaluation with the lowest
  Frechet distance (orbax: items `params` and `info`, written atomically, the previous best deleted after), and
  `checkpoints/best/best.json` says which (`step`, `metric`, `value`, ...). A resumed run sets aside a best whose step
  is after the one it resumes from (that history is being redone) into `checkpoints/best_stale/<step>-<UTC time>/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lpl_jax.diffusion.generate import padded_batches
from lpl_jax.eval import reference as ref_lib
from lpl_jax.train import build, files, sharding
from lpl_jax.train.errors import ConfigError
from lpl_jax.train.metrics import METRICS_FILE

log = logging.getLogger(__name__)

EVAL_STREAM = 3  # fold_in(key(seed), n): 1 is the data's posterior draws, 2 the sample grids' noise
PREFIX = 'eval/'
BEST = 'best'
BEST_INFO = 'best.json'
STALE = 'best_stale'


def due(exp: Any, step: int) -> bool:
  """Whether step `step` (steps done) is evaluated: every `eval.every` steps and at `total_steps` (0: never)."""
  every = exp.eval.every
  return every > 0 and step > 0 and (step % every == 0 or step == exp.total_steps)


def batch_size(exp: Any) -> int:
  """Rows per sampling call over all devices: `eval.batch_size`, or `data.global_batch` when 0."""
  return exp.eval.batch_size or exp.data.global_batch


def metric_names(extractor: str) -> tuple[str, ...]:
  """The row's metric names, the Frechet distance first."""
  names = (ref_lib.DISTANCE_NAMES[extractor], 'precision', 'recall', 'density', 'coverage')
  return tuple(PREFIX + n for n in names)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def same_everywhere(values: np.ndarray) -> np.ndarray:
  """Process 0's float64 `values` on every process, bit for bit (sent as int32 words: JAX runs without x64), so
  that every process takes the same decisions from them (e.g. whether to save a new best)."""
  values = np.ascontiguousarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils

  words = multihost_utils.broadcast_one_to_all(np.frombuffer(values.tobytes(), np.int32))
  return np.frombuffer(np.asarray(words, np.int32).tobytes(), np.float64).reshape(values.shape)


def load_reference(exp: Any) -> ref_lib.Reference:
  """`eval.reference`, checked against `eval.features` and `data.resolution`; errors are ConfigErrors naming it."""
  ev = exp.eval
  try:
    return ref_lib.load_reference(
      ev.reference, features=ev.features, resolution=exp.data.resolution, what='eval.reference'
    )
  except FileNotFoundError:
    raise
  except (ValueError, OSError) as e:  # another extractor or resolution, not a reference file, unreadable
    raise ConfigError(' '.join(str(e).split())) from e


class Evaluator:
  """The run's evaluation, built once: the reference, the extractor on the mesh, the conditions and the compiled
  feature function; `evaluate(ema_params)` is then a pure function of the params.

  Args:
    run: the loop's `Run` (its `generate_fn`, mesh, autoencoder params, source and experiment).
  """

  def __init__(self, run: Any):
    exp = run.exp
    self.exp, self.mesh = exp, run.mesh
    self.reference = load_reference(exp)
    try:
      extractor = ref_lib.reference_extractor(self.reference, inception_weights=exp.eval.inception_weights or None)
    except ValueError as e:
      raise ConfigError(f'eval.inception_weights={exp.eval.inception_weights!r}: {e}') from e
    self.names = metric_names(extractor.name)
    self.batch_size = batch_size(exp)
    self._generate, self._ae_params = run.generate_fn, run.ae_params
    self._extractor_params = sharding.replicate(extractor.params, run.mesh)
    self._cond = build.sample_conditions(exp, run.source, exp.eval.num_images)
    self._key = jax.random.fold_in(jax.random.key(exp.seed), EVAL_STREAM)
    self.traces = 0  # how often the feature function was traced: once per run

    def features(params, images):  # uint8 [B, H, W, 3] -> float32 [B, D], rows sharded as the sampler left them
      self.traces += 1
      return extractor.apply(params, images)

    self._features = jax.jit(features)

  def _place(self, rows: np.ndarray) -> jax.Array:
    """Host rows (the same on every process) as the sample grids pass them, so that both share one compiled sampler;
    the sampler shards its rows over the mesh itself (`make_generate_fn`'s sharding of the starting noise)."""
    return jnp.asarray(rows)

  def _samples(self, ema_params: Any) -> Iterator[tuple[int, jax.Array]]:
    """`(valid rows, uint8 [batch_size, H, W, 3] on the devices)` per sampling call; batch i's noise is
    `fold_in(eval key, i)`, the last batch padded with copies of its last condition."""
    for i, (n, cond) in enumerate(padded_batches(self._cond, self.batch_size)):
      placed = {k: self._place(v) for k, v in cond.items()}
      yield n, self._generate(ema_params, self._ae_params, jax.random.fold_in(self._key, i), placed)

  def images(self, ema_params: Any) -> np.ndarray:
    """The evaluation's samples, uint8 `[num_images, H, W, 3]`, on every process (what `features` sees)."""
    return np.concatenate([sharding.to_host(x)[:n] for n, x in self._samples(ema_params)])

  def features(self, ema_params: Any) -> np.ndarray:
    """float32 `[num_images, D]` features of the samples, on every process. Every batch is dispatched before any is
    read back, so the devices never wait for the host."""
    pending = [(n, self._features(self._extractor_params, x)) for n, x in self._samples(ema_params)]
    return np.concatenate([sharding.to_host(f)[:n] for n, f in pending])

  def samples_and_features(self, ema_params: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(uint8 [num_images, H, W, 3] samples, float32 [num_images, D] their features)` from one sampling pass, on
    every process (what `images` and `features` give, without sampling twice)."""
    pending = [(n, x, self._features(self._extractor_params, x)) for n, x in self._samples(ema_params)]
    images = np.concatenate([sharding.to_host(x)[:n] for n, x, _ in pending])
    return images, np.concatenate([sharding.to_host(f)[:n] for n, _, f in pending])

  def evaluate(self, ema_params: Any) -> dict[str, float]:
    """`{eval/fid or eval/fd_small_domain, eval/precision, eval/recall, eval/density, eval/coverage,
    eval/seconds}`, the same on every process (process 0's)."""
    t0 = time.perf_counter()
    values = ref_lib.compare(self.reference, self.features(ema_params))
    vector = same_everywhere(np.asarray([values[n[len(PREFIX) :]] for n in self.names], np.float64))
    return dict(zip(self.names, map(float, vector), strict=True), **{PREFIX + 'seconds': time.perf_counter() - t0})


class BestKeeper:
  """The EMA params of the best (lowest Frechet distance) evaluation, in `<checkpoints>/best/<step>/`, and
  `best.json` next to them. Every process takes part in a save (the params may be sharded over processes).

  Args:
    directory: `<workdir>/checkpoints/best`.
    start: the step the run starts from; a best of a later step is set aside (its history is being redone).
    metric: the Frechet distance's name (`eval/fid` or `eval/fd_small_domain`).
  """

  def __init__(self, directory: str | os.PathLike, *, start: int, metric: str):
    self.directory, self.metric = epath.Path(directory), metric
    self.step: int | None = None
    self.value = math.inf
    with self._manager() as manager:
      steps = sorted(manager.all_steps())
    stale = [s for s in steps if s > start]
    if stale:
      self._set_aside(stale, start)
      with self._manager() as manager:
        steps = sorted(manager.all_steps())
    if steps:
      info = self.info(steps[-1])
      self.step, self.value = steps[-1], float(info['value'])
    if stale and jax.process_index() == 0:
      self._write_summary(self.info(self.step) if steps else None)

  def _manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(self.directory, item_names=('params', 'info'), options=options)

  def _set_aside(self, steps: list[int], start: int) -> None:
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
      for s in steps:
        target = self.directory.parent / STALE / f'{s}-{stamp}'
        files.move_tree(self.directory / str(s), target)
        log.warning(
          'the best evaluation kept (step %d) is after step %d, where the run resumes: moved to %s.', s, start, target
        )
    _sync('lpl_jax_eval_best_stale')

  def info(self, step: int) -> dict[str, Any]:
    """What was recorded with the best of `step`."""
    with self._manager() as manager:
      return dict(manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))['info'])

  def _write_summary(self, info: dict[str, Any] | None) -> None:
    path = self.directory / BEST_INFO
    if info is None:
      path.unlink(missing_ok=True)
    else:
      files.write_text(
        path, json.dumps(dict(info, path=os.fspath(self.directory / str(info['step']))), indent=2) + '\n'
      )

  def offer(self, step: int, metrics: dict[str, float], ema_params: Any) -> bool:
    """Keeps `ema_params` as the best when `metrics[metric]` is below the best so far; returns whether it did."""
    value = metrics[self.metric]
    if not value < self.value:
      return False
    info = dict(step=step, metric=self.metric, value=value, metrics=metrics, time=time.time())
    with self._manager() as manager:
      if step not in manager.all_steps():  # else a re-evaluation of the step kept: those are its params already
        args = ocp.args.Composite(params=ocp.args.StandardSave(ema_params), info=ocp.args.JsonSave(info))
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
    self.step, self.value = step, value
    if jax.process_index() == 0:
      self._write_summary(info)
    return True


def load_best(directory: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
  """`(EMA params, info)` of the best evaluation kept in `directory` (`<workdir>/checkpoints/best`), restored into
  the structure, dtypes and shardings of `like` (params, or `jax.ShapeDtypeStruct`s with shardings)."""
  keeper = ocp.CheckpointManager(epath.Path(directory), item_names=('params', 'info'))
  try:
    step = keeper.latest_step()
    if step is None:
      raise FileNotFoundError(f'{os.fspath(directory)!r} holds no best evaluation.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = keeper.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract), info=ocp.args.JsonRestore())
    )
    return out['params'], dict(out['info'])
  finally:
    keeper.close()


def _has_eval_row(workdir: str, step: int) -> bool:
  """Whether `metrics.jsonl` has an evaluation row at `step` (read by process 0, told to all)."""
  found = 0
  if jax.process_index() == 0:
    text = files.read_text(os.path.join(workdir, METRICS_FILE)) or ''
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
    found = int(any(r.get('step') == step and any(k.startswith(PREFIX) for k in r) for r in rows))
  return bool(same_everywhere(np.asarray([found]))[0])


class InLoop:
  """What the loop calls: `at(state, step, logger)` after each step (evaluates when `due`)."""

  def __init__(self, run: Any, workdir: str, *, start: int):
    self.evaluator = Evaluator(run)
    self.best = (
      BestKeeper(os.path.join(workdir, 'checkpoints', BEST), start=start, metric=self.evaluator.names[0])
      if run.exp.eval.keep_best
      else None
    )

  def run(self, state: Any, step: int, logger: Any) -> dict[str, float]:
    """Evaluates `state`'s EMA params as step `step`, keeps them if best, and logs the row (process 0)."""
    metrics = self.evaluator.evaluate(state.ema_params)
    if self.best is not None:
      self.best.offer(step, metrics, state.ema_params)  # before the row: a row implies its best is settled
    logger.writer.write(step, metrics)
    log.info('step %d: %s', step, ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()))
    return metrics

  def at(self, state: Any, step: int, logger: Any) -> dict[str, float] | None:
    return self.run(state, step, logger) if due(self.evaluator.exp, step) else None


def start(run: Any, workdir: str, state: Any, step: int, *, resumed: bool, logger: Any) -> InLoop | None:
  """The loop's evaluation (None when `eval.every` is 0). A run resumed at an evaluation step whose row is missing
  (stopped between its checkpoint and its evaluation, e.g. after the last step) evaluates it now."""
  if run.exp.eval.every == 0:
    return None
  in_loop = InLoop(run, workdir, start=step)
  if resumed and due(run.exp, step) and not _has_eval_row(workdir, step):
    in_loop.run(state, step, logger)
  return in_loop
