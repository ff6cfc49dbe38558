"""The whole training loop on the CPU demo config, as 1 process x 2 devices or as one of 2 processes x 1 device
(jax.distributed on 127.0.0.1, gloo): 2 steps, then a second call that resumes to step 4, with sample grids every 2
steps and a checkpoint every 2 steps. Everything lands in WORKDIR.

  python -m tests.run.multiprocess_loop WORKDIR                        # 1 process (XLA_FLAGS: 2 devices)
  python -m tests.run.multiprocess_loop WORKDIR PORT PROCESS_ID        # 2 processes (XLA_FLAGS: 1 device each)
"""

import sys

import jax


def main(workdir, port=None, process_id=None):
  if port is not None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
  from lpl_jax.train import loop
  from tests.run import common

  assert jax.device_count() == 2, jax.devices()
  settings = dict(common.LOOP_SETTINGS, **{'data.global_batch': 8})
  first = loop.train_and_evaluate(common.experiment('demo_cpu.py', 'pretrain', total_steps=2, **settings), workdir)
  second = loop.train_and_evaluate(common.experiment('demo_cpu.py', 'pretrain', total_steps=4, **settings), workdir)
  assert (first.finished, first.step, second.finished, second.step) == (True, 2, True, 4), (first, second)


if __name__ == '__main__':
  main(*sys.argv[1:])
