"""The training loop: an `Experiment` -> data, state, compiled step; checkpoints, resume, logging, sample grids.

`train_and_evaluate(exp, workdir)` is what `python -m lpl_jax.main` runs. In `workdir` (for a `gs://` workdir
only the checkpoints; the rest goes to `runs/remote/...` on the host, see `local_output_dir`):

  checkpoints/<step>/     orbax checkpoints: train state + data iterator state (resume is exact)
  metrics.jsonl           one JSON object per logged step
  tensorboard/            TensorBoard event files (tensorboardX)
  samples/<step>.png      sample grids (EMA params by default)
  config.json             the experiment the run was started with

The loop only waits for the device where it must: metrics of step s are read after step s + 1 was dispatched,
and at checkpoint steps before the save, so a non-finite loss is caught at its step and never checkpointed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import data as data_lib
from lpl_jax.autoencoder import AutoencoderKL, sample_posterior
from lpl_jax.eval.report import save_grid
from lpl_jax.train import build, sharding
from lpl_jax.train.checkpoint import Checkpointer, PreemptionWatch
from lpl_jax.train.config import Experiment, step_config
from lpl_jax.train.metrics import MetricLogger
from lpl_jax.train.state import TrainState, make_optimizer
from lpl_jax.train.step import StepConfig
from lpl_jax.train.validate import validate

log = logging.getLogger(__name__)


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


def setup(exp: Experiment) -> Run:
  """Validates the experiment (before anything compiles) and builds the run's pieces, the state freshly
  initialised."""
  validate(exp)
  mesh = sharding.make_mesh(exp.mesh.data, exp.mesh.fsdp)
  ae_model, ae_host = build.load_autoencoder(exp)
  model = build.make_denoiser(exp, ae_model.config.latent_channels)
  step_cfg = step_config(exp)
  optimizer = make_optimizer(step_cfg.optim)
  state, shardings = sharding.init_state(
    build.init_params_fn(exp, model), optimizer, jax.random.key(exp.seed), mesh, fsdp=exp.mesh.shard_params
  )
  step_fn = sharding.jit_train_step(shardings, mesh, model=model, optimizer=optimizer, cfg=step_cfg, ae_model=ae_model)
  source, pipeline = data_pipeline(exp)
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
  )


def restore_init(run: Run) -> TrainState:
  """Post-training: params and EMA (and the optimizer state if asked) of a pre-training checkpoint; step 0."""
  init = run.exp.init
  folder = build.checkpoint_folder(init.checkpoint)
  with Checkpointer(folder, save_every=1, async_save=False) as ckpt:
    restored = ckpt.restore(run.state, step=None if init.step < 0 else init.step)
  if restored is None:
    raise FileNotFoundError(f'init.checkpoint={init.checkpoint!r} holds no checkpoint.')
  src, _, src_step = restored
  log.info('post-training from %s step %d (optimizer %s)', folder, src_step, 'kept' if init.keep_optimizer else 'fresh')
  return run.state.replace(
    params=src.params,
    ema_params=src.ema_params,
    opt_state=src.opt_state if init.keep_optimizer else run.state.opt_state,
  )


def starting_state(run: Run, ckpt: Checkpointer, data_iter: Any) -> tuple[TrainState, int]:
  """`(state, step)` to start from: the workdir's latest checkpoint (and its data position), else the init
  checkpoint of a post-training run, else the fresh state at step 0."""
  restored = ckpt.restore(run.state)
  if restored is not None:
    state, data_state, start = restored
    if data_state:
      data_iter.set_state(data_state)
    log.info('resumed from %s at step %d', ckpt.directory, start)
    return state, start
  if run.exp.init.checkpoint:
    return restore_init(run), 0
  return run.state, 0


def local_output_dir(workdir: str) -> str:
  """Where metrics, TensorBoard events, sample grids and config.json go: the workdir itself, or, for a remote
  workdir (`gs://...`, where only the checkpoints are written, by orbax), `runs/remote/<bucket path>` on this host."""
  if '://' not in workdir:
    return workdir
  local = os.path.join('runs', 'remote', workdir.split('://', 1)[1].strip('/'))
  log.warning('workdir %s is remote: checkpoints go there, logs and samples to %s on this host.', workdir, local)
  return local


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
  """A grid of `num_sample_images` samples (EMA params unless `sample.use_ema` is off) at `path`."""
  exp = run.exp
  cond = build.sample_conditions(exp, run.source, exp.num_sample_images)
  params = state.ema_params if exp.sample.use_ema else state.params
  images = run.generate_fn(
    params, run.ae_params, jax.random.fold_in(jax.random.key(exp.seed), 2), {k: jnp.asarray(v) for k, v in cond.items()}
  )
  if jax.process_index() == 0:
    save_grid(np.asarray(jax.device_get(images)), path)


def train_and_evaluate(exp: Experiment, workdir: str) -> dict[str, float]:
  """Trains to `total_steps`, resuming from `workdir` if it holds a checkpoint; returns the last logged metrics."""
  run = setup(exp)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=exp.checkpoint_every, keep=exp.keep_checkpoints)
  outdir = local_output_dir(workdir)
  os.makedirs(outdir, exist_ok=True)
  data_iter = iter(run.pipeline)
  state, start = starting_state(run, ckpt, data_iter)
  if jax.process_index() == 0:
    with open(os.path.join(outdir, 'config.json'), 'w') as f:
      f.write(exp.to_json())
  logger = MetricLogger(
    outdir, checkpoints=str(ckpt.directory), start=start, total=exp.total_steps, progress=exp.progress
  )
  preempt = PreemptionWatch()
  try:
    state, stopped = _steps(run, state, start, _batches(run, data_iter, start), ckpt, logger, preempt, outdir)
    if not stopped and (start < exp.total_steps or not os.path.isdir(os.path.join(outdir, 'samples'))):
      write_samples(run, state, os.path.join(outdir, 'samples', f'{exp.total_steps:08d}.png'))
    return logger.last
  finally:
    logger.close()
    ckpt.close()
    preempt.close()


def _steps(
  run: Run,
  state: TrainState,
  start: int,
  batches: Any,
  ckpt: Checkpointer,
  logger: MetricLogger,
  preempt: PreemptionWatch,
  outdir: str,
) -> tuple[TrainState, bool]:
  """Steps `start` to `total_steps`; `(state, whether a preemption stopped it)`.

  The metrics of a step are read once the next step is dispatched (`pending`), except at checkpoint steps, which
  are read before the save so that a non-finite step is never saved.
  """
  exp = run.exp
  pending = None
  for step in range(start, exp.total_steps):
    batch, data_state = next(batches)
    state, metrics = run.step_fn(state, batch, run.ae_params)
    logger.count(exp.data.global_batch)
    if pending is not None:
      logger.record(*pending, write=pending[0] % exp.log_every == 0)
    done = step + 1
    pending = (done, metrics)
    stop = preempt.reached(done)
    if stop or done % exp.checkpoint_every == 0 or done == exp.total_steps:
      logger.record(*pending, write=done % exp.log_every == 0 or done == exp.total_steps)
      pending = None
      ckpt.save(done, state, data_state, force=True)
    if exp.sample_every and done % exp.sample_every == 0:
      write_samples(run, state, os.path.join(outdir, 'samples', f'{done:08d}.png'))
    if stop:
      log.warning('preempted: saved step %d, stopping.', done)
      return state, True
  if pending is not None:
    logger.record(*pending, write=True)
  return state, False
