"""The training loop: an `Experiment` -> data, state, compiled step; checkpoints, resume, logging, sample grids.

`train_and_evaluate(exp, workdir)` is what `python -m lpl_jax.main` runs. Everything goes to `workdir`, a local
folder or a `gs://` one alike (through `train.files`; orbax writes the checkpoints):

  lock.json               the running trainer (one writer per workdir, `train.workdir.WorkdirLock`)
  checkpoints/<step>/     orbax checkpoints: train state + data iterator state (resume is exact)
  checkpoints/corrupt/    what could not be restored, moved aside (an unreadable checkpoint, an interrupted save)
  checkpoints/suspect/    the checkpoint whose params the step that tripped the divergence guard evaluated
  metrics.jsonl           one JSON object per logged step, each step once after any restarts
  tensorboard/            TensorBoard event files (tensorboardX)
  samples/<step>.png      sample grids (EMA params by default)
  profile/                a jax.profiler trace of the steps `config.profile` names (TensorBoard, xprof)
  config.json             the experiment the run was started with
  status.json             running | finished | stopped (preempted: rerun to continue) | failed (with the error)
  previous/<time>/        the history of an earlier run whose checkpoints are gone

Everything the run can check before its first step is checked before anything compiles, in this order: the
config (`validate`), the workdir and its lock, the data (the first batch is read), the autoencoder's weights. Then
the step is compiled ahead on abstract inputs (a step that does not fit a device's memory stops there), before the
state is allocated.

The loop only waits for the device where it must: metrics of step s are read after step s + 1 was dispatched,
and at checkpoint steps before the save, so a step whose loss is non-finite (or trips the guard) is never
checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from lpl_jax import data as data_lib
from lpl_jax.autoencoder import AutoencoderKL, sample_posterior
from lpl_jax.data.errors import DataError
from lpl_jax.eval.report import save_grid
from lpl_jax.train import build, evaluation, files, perf, sharding
from lpl_jax.train import workdir as workdir_lib
from lpl_jax.train.checkpoint import Checkpointer, PreemptionWatch
from lpl_jax.train.config import Experiment, step_config
from lpl_jax.train.errors import ConfigError, DivergedError, DivergenceGuardError
from lpl_jax.train.metrics import Guard, MetricLogger, open_history
from lpl_jax.train.state import TrainState, make_optimizer
from lpl_jax.train.step import StepConfig
from lpl_jax.train.validate import validate

log = logging.getLogger(__name__)

STATUS_FILE = 'status.json'


@dataclasses.dataclass
class Run:
  """What `setup` builds from an experiment: everything but the loop."""

  exp: Experiment
  mesh: Any
  model: Any
  ae_model: AutoencoderKL
  ae_params: Any  # replicated on the mesh
  step_cfg: StepConfig
  state: TrainState  # freshly initialised, in its sharded layout
  step_fn: Any  # the jitted train step
  pipeline: Any  # grain IterDataset of this process's rows
  source: Any
  generate_fn: Any  # (params, ae_params, key, cond) -> uint8 images
  cost: perf.CompiledCost | None = None  # of the step compiled ahead (None: compiled at its first call)


def data_pipeline(exp: Experiment) -> tuple[Any, Any]:
  """`(source, pipeline)`: this process's share of the batches, images or cached latents."""
  d = exp.data
  if d.kind == 'cache':
    source = data_lib.make_source(d.source)
    pipeline = data_lib.make_latent_pipeline(
      source,
      global_batch=d.global_batch,
      seed=exp.seed,
      shuffle=d.shuffle,
      sample_posterior=d.latent_sampling == 'sample',
      resolution=d.resolution,
      worker_count=d.worker_count,
      prefetch=d.prefetch,
    )
    return source, pipeline
  source = data_lib.make_source(d.source, split=d.split, data_dir=d.data_dir or None, num_samples=d.num_samples or None)
  pipeline = data_lib.make_image_pipeline(
    source,
    resolution=d.resolution,
    global_batch=d.global_batch,
    seed=exp.seed,
    shuffle=d.shuffle,
    random_flip=d.random_flip,
    random_crop=d.random_crop,
    worker_count=d.worker_count,
    prefetch=d.prefetch,
  )
  return source, pipeline


def _reading(what: str, fn: Callable[[], Any]) -> Any:
  """`fn()`, which reads files a config field names; an error reading them becomes a ConfigError naming the field."""
  try:
    return fn()
  except (ConfigError, FileNotFoundError):
    raise
  except (ValueError, OSError) as e:
    raise ConfigError(f'{what}: {" ".join(str(e).split())}') from e


def setup(exp: Experiment, *, compile_step: bool = True) -> Run:
  """Validates the experiment and builds the run's pieces, the state freshly initialised. The data's first batch
  and the autoencoder's weights are read before anything compiles; then the step is compiled on abstract inputs
  (`compile_step=False` leaves it to the first call)."""
  validate(exp)
  return _build(exp, compile_step=compile_step)


def _build(exp: Experiment, *, compile_step: bool = True) -> Run:
  source, pipeline = _reading(f'data.source={exp.data.source!r}', lambda: data_pipeline(exp))
  next(iter(pipeline))  # an unreadable first batch (a bad image, a truncated shard) fails now, not after compiling
  mesh = sharding.make_mesh(exp.mesh.data, exp.mesh.fsdp)
  ae_model, ae_host = _reading(f'autoencoder.weights={exp.autoencoder.weights!r}', lambda: build.load_autoencoder(exp))
  model = build.make_denoiser(exp, ae_model.config.latent_channels)
  step_cfg = step_config(exp)
  optimizer = make_optimizer(step_cfg.optim)
  inputs = build.abstract_step(exp, model, ae_model, optimizer, mesh, ae_params=ae_host)
  step_fn = sharding.jit_train_step(
    inputs.state_shardings, mesh, model=model, optimizer=optimizer, cfg=step_cfg, ae_model=ae_model
  )
  cost = None
  if compile_step:  # before the state is allocated and the data pipeline started: a step that does not fit stops here
    step_fn, cost = build.compile_step(exp, step_fn, inputs, mesh)
    log.info(
      'train step compiled in %.1f s; per device: %.3f GiB peak (arguments %.3f, temporaries %.3f), %s TFLOP',
      cost.compile_s,
      cost.peak_bytes / perf.GIB,
      cost.argument_bytes / perf.GIB,
      cost.temp_bytes / perf.GIB,
      'unknown' if cost.flops is None else f'{cost.flops / 1e12:.4g}',
    )
  state, _ = sharding.init_state(
    build.init_params_fn(exp, model), optimizer, jax.random.key(exp.seed), mesh, fsdp=exp.mesh.shard_params
  )
  return Run(
    exp,
    mesh,
    model,
    ae_model,
    sharding.replicate(ae_host, mesh),
    step_cfg,
    state,
    step_fn,
    pipeline,
    source,
    build.make_generate_fn(exp, model, ae_model, mesh),
    cost,
  )


def restore_init(run: Run) -> TrainState:
  """Post-training: params and EMA (and the optimizer state if asked) of a pre-training checkpoint, or params and
  EMA both from imported pretrained weights with a fresh optimizer; step 0."""
  init = run.exp.init
  if build.is_pretrained(init.checkpoint):
    host = _reading(f'init.checkpoint={init.checkpoint!r}', lambda: build.import_denoiser(run.model, init.checkpoint))
    params = build.place_like(host, run.state.params)
    log.info('post-training from the pretrained weights %s (optimizer fresh)', init.checkpoint)
    return run.state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
  folder = build.checkpoint_folder(init.checkpoint)
  with Checkpointer(folder, save_every=1, async_save=False) as ckpt:
    restored = _reading(
      f'init.checkpoint={init.checkpoint!r}', lambda: ckpt.restore(run.state, step=None if init.step < 0 else init.step)
    )
  if restored is None:
    raise FileNotFoundError(f'init.checkpoint={init.checkpoint!r} holds no checkpoint.')
  src, _, src_step = restored
  log.info('post-training from %s step %d (optimizer %s)', folder, src_step, 'kept' if init.keep_optimizer else 'fresh')
  return run.state.replace(
    params=src.params,
    ema_params=src.ema_params,
    opt_state=src.opt_state if init.keep_optimizer else run.state.opt_state,
  )


def starting_state(run: Run, ckpt: Checkpointer, data_iter: Any) -> tuple[TrainState, int, bool]:
  """`(state, step, resumed)` to start from: the workdir's latest readable checkpoint (and its data position), else
  the init checkpoint of a post-training run, else the fresh state at step 0."""
  restored = ckpt.restore(run.state)
  if restored is not None:
    state, data_state, start = restored
    if data_state:
      data_iter.set_state(data_state)
    log.info('resumed from %s at step %d', ckpt.directory, start)
    return state, start, True
  log.info('no checkpoint in %s: starting at step 0', ckpt.directory)
  if run.exp.init.checkpoint:
    return restore_init(run), 0, False
  return run.state, 0, False


def _encode_fn(run: Run):
  """Images (global, sharded) -> scaled latents, a posterior sample (from `key`) or the mean."""
  ae_model, sample = run.ae_model, run.exp.data.latent_sampling == 'sample'

  @jax.jit
  def encode(ae_params, images, key):
    mean, logvar = ae_model.apply({'params': ae_params}, images, method=ae_model.encode)
    return ae_model.scale_latents(sample_posterior(key, mean, logvar) if sample else mean)

  return encode


def _batches(run: Run, data_iter: Any, start: int):
  """`(step batch on the mesh, data iterator state after it)` forever; images are encoded to latents on the way."""
  encode = None if run.exp.data.kind == 'cache' else _encode_fn(run)
  data_key = jax.random.fold_in(jax.random.key(run.exp.seed), 1)
  keep = ('latents', 'context') if run.exp.model.text else ('latents', 'labels', 'images')
  step = start  # the posterior draw of step s is keyed by s: a resumed run draws what an uninterrupted one does
  while True:
    local = next(data_iter)
    if run.exp.model.text:
      local = dict(local, context=local['text'])
    batch = sharding.global_batch({k: v for k, v in local.items() if k in keep}, run.mesh)
    if encode is not None:
      batch['latents'] = encode(run.ae_params, batch.pop('images'), jax.random.fold_in(data_key, step))
    yield batch, data_iter.get_state()
    step += 1


def write_samples(run: Run, state: TrainState, path: str) -> None:
  """A grid of `num_sample_images` samples (EMA params unless `sample.use_ema` is off) at `path`; every process
  takes part (the images are gathered from all of them), process 0 writes."""
  exp = run.exp
  cond = build.sample_conditions(exp, run.source, exp.num_sample_images)
  params = state.ema_params if exp.sample.use_ema else state.params
  images = run.generate_fn(
    params, run.ae_params, jax.random.fold_in(jax.random.key(exp.seed), 2), {k: jnp.asarray(v) for k, v in cond.items()}
  )
  images = sharding.to_host(images)
  if jax.process_index() == 0:
    save_grid(images, path)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a call of `train_and_evaluate` ended.

  Attributes:
    finished: `total_steps` was reached; else a preemption (SIGTERM) stopped the run after saving `step`: run the
      same command again to continue.
    step: the last step trained.
    metrics: the last logged metrics.
  """

  finished: bool
  step: int
  metrics: dict[str, float]


def write_status(workdir: str, state: str, step: int, total_steps: int, message: str = '') -> None:
  """`<workdir>/status.json` (process 0): `running`, `finished`, `stopped` (preempted, rerun to continue) or
  `failed` (an error to fix first, in `message`); what a supervisor outside the machine reads."""
  if jax.process_index() == 0:
    record = dict(state=state, step=step, total_steps=total_steps, time=time.time(), message=message)
    files.write_text(os.path.join(workdir, STATUS_FILE), json.dumps(record) + '\n')


def train_and_evaluate(exp: Experiment, workdir: str, *, force: bool = False) -> Outcome:
  """Trains to `total_steps`, resuming from `workdir` if it holds a checkpoint. Every output goes to `workdir`,
  a local folder or `gs://...` alike.

  Args:
    force: take the workdir's lock even if another trainer seems to hold it (its machine was lost).

  Raises:
    ConfigError, DataError, WorkdirError: before anything compiles.
    DivergedError: a non-finite loss or a tripped guard; the message says what the kept checkpoints hold.
  """
  validate(exp)
  workdir_lib.prepare(workdir)
  with workdir_lib.WorkdirLock(workdir, force=force):
    return _train(_build(exp), workdir)


def _train(run: Run, workdir: str) -> Outcome:
  exp = run.exp
  ckpt = Checkpointer(
    os.path.join(workdir, 'checkpoints'), save_every=exp.checkpoint_every, keep=exp.keep_checkpoints, quarantine=True
  )
  data_iter = iter(run.pipeline)
  state, start, resumed = starting_state(run, ckpt, data_iter)
  purge_step = open_history(workdir, start, resumed=resumed)
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, 'config.json'), exp.to_json())
  write_status(workdir, 'running', start, exp.total_steps)
  g = exp.guard
  guard = Guard(g.loss_spike, g.window, g.max_grad_norm) if g.loss_spike or g.max_grad_norm else None
  logger = MetricLogger(
    workdir,
    start=start,
    total=exp.total_steps,
    progress=exp.progress,
    guard=guard,
    purge_step=purge_step,
    cost=run.cost,
    peak_tflops=perf.peak_tflops(run.mesh.local_devices[0].device_kind),
  )
  preempt = PreemptionWatch()
  profile = perf.ProfileWindow(exp.profile.start_step, exp.profile.num_steps, exp.profile.all_processes, workdir)
  saved: dict[int, dict[str, float]] = {}
  samples = os.path.join(workdir, 'samples')
  try:
    with logger.paused():
      evaluator = evaluation.start(run, workdir, state, start, resumed=resumed, logger=logger)  # None: eval.every 0
    state, done = _steps(
      run, state, start, _batches(run, data_iter, start), ckpt, logger, preempt, workdir, saved, evaluator, profile
    )
    finished = done == exp.total_steps
    if finished and (start < exp.total_steps or not epath.Path(samples).exists()):
      write_samples(run, state, os.path.join(samples, f'{exp.total_steps:08d}.png'))
    ckpt.wait()
    write_status(workdir, 'finished' if finished else 'stopped', done, exp.total_steps)
    return Outcome(finished, done, logger.last)
  except DivergedError as e:
    ckpt.wait()
    e.checkpoints = after_divergence(e, ckpt, saved)
    write_status(workdir, 'failed', e.step, exp.total_steps, str(e))
    raise
  except DataError as e:
    write_status(workdir, 'failed', start, exp.total_steps, str(e))
    raise
  finally:
    profile.close()
    logger.close()
    ckpt.close()
    preempt.close()


def after_divergence(error: DivergedError, ckpt: Checkpointer, saved: dict[int, dict[str, float]]) -> str:
  """What the kept checkpoints hold after `error` stopped the run, in words; a guard stop first moves the checkpoint
  whose params the failing step evaluated to `suspect/`, so that the newest one kept was vetted by a later step.

  Args:
    saved: the metrics logged at the steps this run saved.
  """
  moved, steps = '', ckpt.all_steps()
  if isinstance(error, DivergenceGuardError) and steps and steps[-1] == error.step - 1:
    target = ckpt.set_aside_step(steps[-1], f'step {error.step} evaluated its params and tripped the guard', 'suspect')
    moved, steps = (
      f'Checkpoint {steps[-1]}, whose params step {error.step} evaluated, was moved to {target}. ',
      steps[:-1],
    )
  if not steps:
    return f'{moved}No checkpoint is left in {ckpt.directory}.'
  k, m = steps[-1], saved.get(steps[-1], {})
  held = ', '.join(f'{n} {m[n]:.4g}' for n in ('loss/diffusion', 'grad_norm', 'param_norm') if n in m)
  held = f' (logged at that step: {held})' if held else ''
  if k == error.step - 1:
    verdict = (
      f'; step {error.step} evaluated its params, so they may be bad too: move it aside to resume from an earlier '
      'one, and see guard.* in docs/train.md to stop before a diverging step is saved.'
    )
  else:
    verdict = f'; its params passed the checks at step {k + 1}.'
  return f'{moved}The newest checkpoint is step {k} in {ckpt.directory}{held}{verdict}'


def _steps(
  run: Run,
  state: TrainState,
  start: int,
  batches: Any,
  ckpt: Checkpointer,
  logger: MetricLogger,
  preempt: PreemptionWatch,
  outdir: str,
  saved: dict[int, dict[str, float]],
  evaluator: evaluation.InLoop | None = None,
  profile: perf.ProfileWindow | None = None,
) -> tuple[TrainState, bool]:
  """Steps `start` to `total_steps`; `(state, the last step done)`, which is short of `total_steps` when a
  preemption stopped the run; `saved` gets the metrics of each step saved; `profile` traces its window.

  The metrics of a step are read once the next step is dispatched (`pending`), except at checkpoint steps, which
  are read before the save so that a non-finite step is never saved.
  """
  exp = run.exp
  pending = None
  profile = profile or perf.ProfileWindow(0, 0, False, outdir)
  for step in range(start, exp.total_steps):
    batch, data_state = next(batches)
    profile.before(step)
    with profile.annotation(step):
      state, metrics = run.step_fn(state, batch, run.ae_params)
    logger.count(exp.data.global_batch)
    if pending is not None:
      logger.record(*pending, write=pending[0] % exp.log_every == 0)
    done = step + 1
    profile.after(done, metrics)
    pending = (done, metrics)
    stop = preempt.reached(done)
    if stop or done % exp.checkpoint_every == 0 or done == exp.total_steps:
      logger.record(*pending, write=done % exp.log_every == 0 or done == exp.total_steps)
      pending = None
      ckpt.save(done, state, data_state, force=True)
      saved[done] = logger.recorded[1]
    with logger.paused():  # the step time leaves these out
      if exp.sample_every and done % exp.sample_every == 0:
        write_samples(run, state, os.path.join(outdir, 'samples', f'{done:08d}.png'))
      if evaluator is not None and not stop:  # a preempted run evaluates this step when it resumes
        evaluator.at(state, done, logger)  # every eval.every steps and at the end; reads the state, changes nothing
    if stop:
      log.warning('preempted: saved step %d, stopping.', done)
      return state, done
  if pending is not None:
    logger.record(*pending, write=True)
  return state, exp.total_steps
