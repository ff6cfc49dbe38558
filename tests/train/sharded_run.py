"""Runs 3 train steps on several meshes of 8 simulated CPU devices and on 1 device; writes losses and params.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/train/test_sharded.py).
"""

import sys

import jax
import numpy as np

from lpl_jax import train
from tests.train import common

# name: (data, fsdp, shard params, gradient accumulation steps)
MESHES = {
  'one': (1, 1, False, 1),
  'data8': (8, 1, False, 1),
  'fsdp8': (1, 8, True, 1),
  'mixed': (2, 4, True, 1),
  'fsdp4_accum2': (1, 4, True, 2),
}


def run(name):
  data, fsdp, shard_params, accum = MESHES[name]
  devices = jax.devices()[: data * fsdp]
  mesh = train.make_mesh(data, fsdp, devices=devices)
  model, ae_model, ae_params, cfg = common.setup(groups=8, accum=accum)
  optimizer = train.make_optimizer(cfg.optim)
  state, shardings = train.init_state(
    common.init_params_fn(model), optimizer, jax.random.key(0), mesh, fsdp=shard_params
  )
  step = train.jit_train_step(shardings, mesh, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model)
  batch = jax.device_put(common.batch(), train.batch_sharding(mesh))
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, ae_params)
    losses.append([float(metrics['loss/total']), float(metrics['loss/lpl'])])
  flat = jax.tree.leaves(jax.device_get(state.params))
  return np.asarray(losses), np.concatenate([x.ravel() for x in flat])


if __name__ == '__main__':
  out = {}
  for name in MESHES:
    losses, params = run(name)
    out[f'{name}_losses'], out[f'{name}_params'] = losses, params
  np.savez(sys.argv[1], **out)
