"""The whole training loop on the CPU demo config with LPL on from the first step, as 1 process x 4 devices or as
one of 2 processes x 2 devices (jax.distributed on 127.0.0.1, gloo): 2 steps, then a second call that resumes to
step 4, with sample grids every 2 steps and a checkpoint every 2 steps. Everything lands in WORKDIR; the autoencoder
is read from AUTOENCODER, a diffusers folder (random weights made once by the test: the preset's random weights would
be initialised, so compiled, in every process).

  python -m tests.run.multiprocess_loop WORKDIR AUTOENCODER                   # 1 process (XLA_FLAGS: 4 devices)
  python -m tests.run.multiprocess_loop WORKDIR AUTOENCODER PORT PROCESS_ID   # 2 processes (XLA_FLAGS: 2 devices each)
"""

import sys

import jax

# LPL from step 0 on a global batch of 8 in 4 stratification groups (one per device, whatever process holds it);
# tau 20 (2.5 at 32 px) puts 1 row of each group under the gate, so every step has LPL rows on every device.
SETTINGS = {'data.global_batch': 8, 'lpl.start_step': 0, 'lpl.groups': 4, 'lpl.tau': 20.0}


def main(workdir, autoencoder, port=None, process_id=None):
  if port is not None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
  from lpl_jax.train import loop
  from tests.run import common

  assert jax.device_count() == 4, jax.devices()
  settings = dict(common.LOOP_SETTINGS, **SETTINGS, **{'autoencoder.weights': autoencoder})
  first = loop.train_and_evaluate(common.experiment('demo_cpu.py', 'post,lpl', total_steps=2, **settings), workdir)
  second = loop.train_and_evaluate(common.experiment('demo_cpu.py', 'post,lpl', total_steps=4, **settings), workdir)
  assert (first.finished, first.step, second.finished, second.step) == (True, 2, True, 4), (first, second)


if __name__ == '__main__':
  main(*sys.argv[1:])
