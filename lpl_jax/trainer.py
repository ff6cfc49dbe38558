"""The training loop: config -> data, state, compiled step; checkpoints, resume, logging, sample grids.

`train_and_evaluate(config, workdir)` is what `python -m lpl_jax.main` runs. In `workdir` (for a `gs://` workdir
only the checkpoints; the rest goes to `runs/remote/...` on the host, see `local_output_dir`):

  checkpoints/<step>/     orbax checkpoints: train state + data iterator state (resume is exact)
  metrics.jsonl           one JSON object per logged step
  tensorboard/            TensorBoard event files (tensorboardX)
  samples/<step>.png      sample grids (EMA params by default)
  config.json             the config the run was started with

The loop only waits for the device where it must: metrics of step s are read after step s + 1 was dispatched,
and at checkpoint steps before the save, so a non-finite loss is caught at its step and never checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from lpl_jax import data as data_lib
from lpl_jax import diffusion, train
from lpl_jax import experiment as exp
from lpl_jax.autoencoder import AutoencoderKL, sample_posterior
from lpl_jax.train.checkpoint import Checkpointer, PreemptionWatch

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; the run stops and its last checkpoint is the last good state."""

  def __init__(self, step: int, term: str, value: float):
    super().__init__(f'step {step}: {term} = {value}; stopping (the last checkpoint holds the last good state).')
    self.step, self.term = step, term


class MetricWriter:
  """Scalars to `metrics.jsonl` and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, only where metrics are written

    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115 - closed in close()
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def save_grid(images: np.ndarray, path: str, columns: int | None = None) -> None:
  """uint8 `[N, H, W, 3]` -> one PNG grid."""
  n, h, w, ch = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * h, columns * w, ch), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid).save(path)


def to_uint8(images: jax.Array) -> jax.Array:
  return jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8)


def make_sample_fn(c: ml_collections.ConfigDict, model: Any, ae_model: AutoencoderKL,
                   form: diffusion.Formulation, mesh: Any = None):
  """`(params, ae_params, key, cond) -> uint8 images [N, H, W, 3]`, jitted: the configured sampler from pure noise,
  then the decoder. `cond` is `{'labels': [N]}`, or `{'context': [N, L, D]}` for text models (classifier-free
  guidance then uses zero embeddings as the null condition)."""
  shape = exp.latent_shape(c)
  sc = c.sample

  def fn(params, ae_params, key, cond):
    noise_key, key = jax.random.split(key)
    if 'labels' in cond:
      y, null = cond['labels'], c.model.num_classes

      def model_fn(x, t, y):
        return model.apply({'params': params}, x, t, y)
    else:
      n = cond['context'].shape[0]
      y, null = jnp.arange(n), -1

      def model_fn(x, t, y):
        ctx = {k: jnp.where((y >= 0).reshape((-1,) + (1,) * (v.ndim - 1)), v[jnp.clip(y, 0)], 0)
               for k, v in cond.items()}
        return model.apply({'params': params}, x, t, None, **ctx)
    x0 = jax.random.normal(noise_key, (y.shape[0], *shape))
    if mesh is not None:  # each device samples its rows
      x0 = jax.lax.with_sharding_constraint(x0, train.batch_sharding(mesh))
    z = diffusion.sample(model_fn, form, x0, key, sampler=sc.sampler, num_steps=sc.steps, eta=sc.eta,
                         guidance_scale=sc.guidance, y=y, null_class=null, shift=c.diffusion.shift)
    images = ae_model.apply({'params': ae_params}, ae_model.unscale_latents(z), method=ae_model.decode)
    return to_uint8(images)

  return jax.jit(fn)


@dataclasses.dataclass
class Run:
  """What `setup` builds from a config (everything but the loop)."""

  config: ml_collections.ConfigDict
  mesh: Any
  model: Any
  ae_model: AutoencoderKL
  ae_params: Any  # replicated on the mesh
  step_cfg: train.StepConfig
  optimizer: Any
  state: train.TrainState
  state_shardings: Any
  step_fn: Any
  pipeline: Any  # grain IterDataset of this process's rows
  source: Any


def setup(c: ml_collections.ConfigDict) -> Run:
  """Validates the config (before anything compiles) and builds the run's pieces, the state freshly initialised."""
  exp.validate(c)
  mesh = train.make_mesh(c.mesh.data, c.mesh.fsdp)
  ae_model, ae_host = exp.load_autoencoder(c)
  if c.autoencoder.remat:
    ae_model = ae_model.clone(remat=True)
  ae_params = train.replicate(ae_host, mesh)
  model = exp.make_model(c, ae_model.config.latent_channels)
  step_cfg = exp.step_config(c)
  optimizer = train.make_optimizer(step_cfg.optim)
  state, shardings = train.init_state(exp.init_params_fn(c, model), optimizer, jax.random.key(c.seed), mesh,
                                      fsdp=c.mesh.shard_params)
  step_fn = train.jit_train_step(shardings, mesh, model=model, optimizer=optimizer, cfg=step_cfg,
                                 ae_model=ae_model)
  d = c.data
  kind, _, arg = d.source.partition(':')
  if kind == 'cache':
    source = data_lib.make_source(d.source)
    pipeline = data_lib.make_latent_pipeline(source, global_batch=d.global_batch, seed=c.seed, shuffle=d.shuffle,
                                             sample_posterior=d.latent_sampling == 'sample', resolution=d.resolution,
                                             worker_count=d.worker_count, prefetch=d.prefetch)
  else:
    source = data_lib.make_source(d.source, split=d.split, data_dir=d.data_dir or None,
                                  num_samples=d.num_samples or None)
    pipeline = data_lib.make_image_pipeline(source, resolution=d.resolution, global_batch=d.global_batch,
                                            seed=c.seed, shuffle=d.shuffle, random_flip=d.random_flip,
                                            random_crop=d.random_crop, worker_count=d.worker_count,
                                            prefetch=d.prefetch)
  return Run(c, mesh, model, ae_model, ae_params, step_cfg, optimizer, state, shardings, step_fn, pipeline, source)


def sample_conditions(c: ml_collections.ConfigDict, source: Any) -> dict[str, jax.Array]:
  """What the sample grids are conditioned on: classes 0, 1, ... or the text embeddings of the first records."""
  n = c.num_sample_images
  if c.model.context_dim:
    return {'context': jnp.asarray(np.stack([source[i % len(source)]['text'] for i in range(n)]), jnp.float32)}
  return {'labels': jnp.arange(n, dtype=jnp.int32) % c.model.num_classes}


def _make_encode_fn(run: Run):
  """Images (global, sharded) -> scaled latents, a posterior sample (from `key`) or the mean."""
  ae_model, sample = run.ae_model, run.config.data.latent_sampling == 'sample'

  @jax.jit
  def encode(ae_params, images, key):
    mean, logvar = ae_model.apply({'params': ae_params}, images, method=ae_model.encode)
    z = sample_posterior(key, mean, logvar) if sample else mean
    return ae_model.scale_latents(z)

  return encode


def _to_step_batch(local: dict[str, np.ndarray], text: bool) -> dict[str, np.ndarray]:
  if text:
    return {'latents': local['latents'], 'context': local['text']}
  return {k: v for k, v in local.items() if k in ('latents', 'labels', 'images')}


def _restore_init(run: Run, c: ml_collections.ConfigDict) -> train.TrainState:
  """Post-training: params and EMA (and the optimizer state if asked) of a pre-training checkpoint; step 0."""
  folder = c.init.checkpoint
  if os.path.isdir(os.path.join(folder, 'checkpoints')):
    folder = os.path.join(folder, 'checkpoints')
  ckpt = Checkpointer(folder, save_every=1, async_save=False)
  restored = ckpt.restore(run.state, step=None if c.init.step < 0 else c.init.step)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'init.checkpoint={c.init.checkpoint!r} holds no checkpoint.')
  src, _, src_step = restored
  log.info('post-training from %s step %d (optimizer %s)', folder, src_step,
           'kept' if c.init.keep_optimizer else 'fresh')
  return run.state.replace(params=src.params, ema_params=src.ema_params,
                           opt_state=src.opt_state if c.init.keep_optimizer else run.state.opt_state)


def _check_finite(step: int, metrics: dict[str, Any]) -> dict[str, float]:
  scalars = {k: float(v) for k, v in metrics.items()}
  for k in ('loss/total', 'loss/diffusion', 'loss/lpl', 'grad_norm'):
    if k in scalars and not math.isfinite(scalars[k]):
      raise NonFiniteLossError(step, k, scalars[k])
  return scalars


def local_output_dir(workdir: str) -> str:
  """Where metrics, TensorBoard events, sample grids and config.json go: the workdir itself, or, for a remote
  workdir (`gs://...`, where only the checkpoints are written, by orbax), `runs/remote/<bucket path>` on this host."""
  if '://' not in workdir:
    return workdir
  local = os.path.join('runs', 'remote', workdir.split('://', 1)[1].strip('/'))
  log.warning('workdir %s is remote: checkpoints go there, logs and samples to %s on this host.', workdir, local)
  return local


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to `total_steps`, resuming from `workdir` if it holds a checkpoint; returns the last logged metrics."""
  run = setup(c)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=c.checkpoint_every,
                      keep=c.keep_checkpoints)
  workdir = local_output_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  state, start = run.state, 0
  data_iter = iter(run.pipeline)
  restored = ckpt.restore(run.state)
  if restored is not None:
    state, data_state, start = restored
    if data_state:
      data_iter.set_state(data_state)
    log.info('resumed from %s at step %d', ckpt.directory, start)
  elif c.init.checkpoint:
    state = _restore_init(run, c)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(c.to_json_best_effort(indent=2))
  writer = MetricWriter(workdir)
  preempt = PreemptionWatch()
  encode = None if c.data.source.startswith('cache:') else _make_encode_fn(run)
  text = bool(c.model.context_dim)
  sample_fn = make_sample_fn(c, run.model, run.ae_model, run.step_cfg.formulation, run.mesh)
  data_key = jax.random.fold_in(jax.random.key(c.seed), 1)
  sample_cond = sample_conditions(c, run.source)
  pending, last = None, {}
  t0, rows = time.perf_counter(), 0
  bar = None
  if c.progress and jax.process_index() == 0:
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=c.total_steps, initial=start, desc='train', dynamic_ncols=True)

  def record(step, metrics, *, log_now):
    nonlocal last, t0, rows
    scalars = _check_finite(step, jax.device_get(metrics))
    if log_now:
      dt = time.perf_counter() - t0
      scalars['img_per_s'] = rows / dt if dt > 0 else 0.0
      t0, rows = time.perf_counter(), 0
      writer.write(step, scalars)
      last = scalars
      if bar is not None:
        bar.set_postfix(loss=f"{scalars['loss/total']:.4f}", lpl=f"{scalars.get('loss/lpl', 0.0):.4f}",
                        img_s=f"{scalars['img_per_s']:.1f}")

  def samples(step, state):
    params = state.ema_params if c.sample.use_ema else state.params
    images = sample_fn(params, run.ae_params, jax.random.fold_in(jax.random.key(c.seed), 2), sample_cond)
    if jax.process_index() == 0:
      save_grid(np.asarray(jax.device_get(images)), os.path.join(workdir, 'samples', f'{step:08d}.png'))

  try:
    for step in range(start, c.total_steps):
      local = _to_step_batch(next(data_iter), text)
      data_state = data_iter.get_state()
      batch = train.global_batch(local, run.mesh)
      if encode is not None:
        batch = {'latents': encode(run.ae_params, batch.pop('images'), jax.random.fold_in(data_key, step)), **batch}
      state, metrics = run.step_fn(state, batch, run.ae_params)
      rows += c.data.global_batch
      if pending is not None:
        record(*pending, log_now=pending[0] % c.log_every == 0)
      done = step + 1
      pending = (done, metrics)
      stop = preempt.reached(done)
      if stop or done % c.checkpoint_every == 0 or done == c.total_steps:
        record(*pending, log_now=done % c.log_every == 0 or done == c.total_steps)
        pending = None
        ckpt.save(done, state, data_state, force=True)
      if c.sample_every and done % c.sample_every == 0:
        samples(done, state)
      if bar is not None:
        bar.update(1)
      if stop:
        log.warning('preempted: saved step %d, stopping.', done)
        return last
    if pending is not None:
      record(*pending, log_now=True)
    if start < c.total_steps or not os.path.isdir(os.path.join(workdir, 'samples')):
      samples(c.total_steps, state)
    return last
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
    preempt.close()
