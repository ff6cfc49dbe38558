"""3 train steps on a 4-device data mesh, either as 1 process x 4 CPU devices or as one of 2 processes x 2 CPU
devices joined with jax.distributed on 127.0.0.1 (gloo collectives). Writes losses and params (process 0).

  python -m tests.train.multiprocess_run OUT.npz                       # 1 process (XLA_FLAGS: 4 devices)
  python -m tests.train.multiprocess_run OUT.npz PORT PROCESS_ID       # 2 processes (XLA_FLAGS: 2 devices each)
"""

import sys

import jax
import numpy as np


def main(out, port=None, process_id=None):
  if port is not None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
  from lpl_jax import autoencoder as ae
  from lpl_jax import train
  from tests.train import common

  assert jax.device_count() == 4, jax.devices()
  mesh = train.make_mesh(4, 1)
  model, ae_model, _, cfg = common.setup(groups=4)
  ae_params = train.replicate(jax.device_get(jax.jit(lambda k: ae.init_params(ae_model, k))(jax.random.key(9))), mesh)
  optimizer = train.make_optimizer(cfg.optim)
  state, shardings = train.init_state(common.init_params_fn(model), optimizer, jax.random.key(0), mesh, fsdp=False)
  step = train.jit_train_step(shardings, mesh, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model)
  full = jax.device_get(common.batch())
  rows = common.BATCH // jax.process_count()
  local = {k: v[jax.process_index() * rows : (jax.process_index() + 1) * rows] for k, v in full.items()}
  batch = train.global_batch(local, mesh)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, ae_params)
    losses.append([float(np.asarray(metrics[k].addressable_data(0))) for k in ('loss/total', 'loss/lpl')])
  params = np.concatenate([np.ravel(np.asarray(x.addressable_data(0))) for x in jax.tree.leaves(state.params)])
  if jax.process_index() == 0:
    np.savez(out, losses=np.asarray(losses), params=params)


if __name__ == '__main__':
  main(*sys.argv[1:])
