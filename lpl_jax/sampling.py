"""Sampling from a training run's checkpoint (the library side of `python -m lpl_jax.sample`): the run's config, its
params restored straight into their sharded layout, and batches of images sharded over the devices."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from lpl_jax import experiment as exp
from lpl_jax import train, trainer
from lpl_jax.train.checkpoint import Checkpointer


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: --workdir must be a training run of lpl_jax.main.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(c: ml_collections.ConfigDict, workdir: str, model, step: int, ema: bool, mesh) -> tuple[Any, int]:
  """The denoiser params of a checkpoint, restored straight into their sharded layout."""
  optimizer = train.make_optimizer(exp.step_config(c, num_devices=mesh.size).optim)
  key = jax.random.key(0)
  boxed = jax.eval_shape(lambda k: train.create_state(exp.init_params_fn(c, model)(k), optimizer, k), key)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, train.param_rules(c.mesh.shard_params))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  with Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, async_save=False) as ckpt:
    restored = ckpt.restore(target, step=None if step < 0 else step)
  if restored is None:
    raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint.')
  state, _, step = restored
  return (state.ema_params if ema else state.params), step


def generate(c, workdir, *, num, batch_size, seed=0, labels='cycle', step=-1, ema=True):
  """`(uint8 images [num, H, W, 3], labels [num] or None, checkpoint step)`."""
  mesh = train.make_mesh(c.mesh.data, c.mesh.fsdp)
  if batch_size % mesh.size:
    raise ValueError(f'--batch_size={batch_size} must be a multiple of the {mesh.size} devices.')
  ae_model, ae_host = exp.load_autoencoder(c)
  ae_params = train.replicate(ae_host, mesh)
  model = exp.make_model(c, ae_model.config.latent_channels)
  params, step = restore_params(c, workdir, model, step, ema, mesh)
  sample_fn = trainer.make_sample_fn(c, model, ae_model, exp.formulation(c), mesh)
  text = bool(c.model.context_dim)
  if text:
    from lpl_jax import data as data_lib  # noqa: PLC0415
    c = c.copy_and_resolve_references()
    c.num_sample_images = num
    cond_all = trainer.sample_conditions(c, data_lib.make_source(c.data.source))['context']
    ys = None
  else:
    rng = np.random.default_rng(seed)
    ys = (np.arange(num) % c.model.num_classes if labels == 'cycle'
          else rng.integers(0, c.model.num_classes, num)).astype(np.int32)
  def pad(x):  # the last batch is filled up with copies of its last row, dropped after sampling
    return np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), 0)])

  images = []
  for i, start in enumerate(tqdm(range(0, num, batch_size), desc='sample', disable=jax.process_index() != 0)):
    n = min(batch_size, num - start)
    cond = ({'context': jax.device_put(pad(np.asarray(cond_all[start:start + n])), train.batch_sharding(mesh))}
            if text else {'labels': jax.device_put(pad(ys[start:start + n]), train.batch_sharding(mesh))})
    out = sample_fn(params, ae_params, jax.random.fold_in(jax.random.key(seed), i), cond)
    images.append(np.asarray(jax.device_get(out))[:n])
  return np.concatenate(images), ys, step
