"""Compile time of the paper-scale LPL train step with the denoiser's blocks unrolled and scanned (`model.scan_layers`).

The step is `configs/imagenet.py:post512,lpl` (the MMDiT of 28 blocks x 1536, the asymmetric autoencoder's decoder in
the LPL branch, AdamW + EMA, the paper's global batch of 256) with FSDP over 8 simulated CPU devices
(`mesh.fsdp=8`, `mesh.shard_params=True`), lowered from abstract inputs by the trainer's own
`lpl_jax.train.build.lower_train_step` and compiled. Both programs are built in this one process, in the order given
by `--order`, with no compilation cache. The time of each is trace + lower + XLA compile: what a run waits for before
its first step.

By default XLA:CPU compiles with its own defaults (`--backend=full`). Its LLVM code generation is not what a TPU or
GPU compiler does; `--backend=analysis` makes it cheap (`xla_backend_optimization_level=0`, no expensive LLVM
passes) to time mostly the HLO passes (SPMD partitioning, fusion, scheduling, buffer assignment) that every backend
runs.

The last line is machine-readable:
  compile_s_unscanned=<float> compile_s_scanned=<float> speedup=<float>

Usage (from the repository root; about 4 minutes on 2 CPU cores):
  python -m benchmarks.compile_time
  python -m benchmarks.compile_time --depth=8 --backend=analysis
"""

from __future__ import annotations

import os

# Eight simulated devices for the FSDP mesh; must be set before jax is imported.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import argparse
import gc
import time

import jax

from lpl_jax.train import build, sharding
from lpl_jax.train.config import Experiment

ANALYSIS_ONLY = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='post512,lpl', help='variant of configs/imagenet.py')
  parser.add_argument('--depth', type=int, default=0, help="denoiser blocks (0: the config's, 28)")
  parser.add_argument('--devices', type=int, default=8, help='FSDP degree (simulated CPU devices, at most 8)')
  parser.add_argument('--backend', default='full', choices=('full', 'analysis'), help='XLA:CPU code generation')
  parser.add_argument('--order', default='unscanned,scanned', help='which program is compiled first')
  return parser.parse_args(argv)


def experiment(args: argparse.Namespace, scan_layers: bool) -> Experiment:
  from configs import imagenet

  c = imagenet.get_config(args.config)
  c.mesh.fsdp, c.mesh.shard_params = args.devices, True
  c.model.scan_layers = scan_layers
  if args.depth:
    c.model.depth = args.depth
  return Experiment.from_config_dict(c)


def compile_step(exp: Experiment, mesh, options: dict) -> dict[str, float]:
  start = time.perf_counter()
  lowered = build.lower_train_step(exp, mesh)
  lowered_at = time.perf_counter()
  compiled = lowered.compile(compiler_options=options)
  done = time.perf_counter()
  flops = (compiled.cost_analysis() or {}).get('flops', float('nan'))
  return dict(lower_s=lowered_at - start, xla_s=done - lowered_at, total_s=done - start, flops=flops)


def main(argv: list[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  jax.config.update('jax_compilation_cache_dir', None)
  jax.config.update('jax_enable_compilation_cache', False)
  devices = jax.devices()[: args.devices]
  mesh = sharding.make_mesh(1, args.devices, devices=devices)
  options = ANALYSIS_ONLY if args.backend == 'analysis' else {}
  exp = experiment(args, False)
  m = exp.model
  print(
    f'imagenet.py:{args.config}: {m.kind} {m.depth} x {m.hidden_size}, remat={m.remat} ({m.remat_policy}), '
    f'{exp.data.resolution} px, global batch {exp.data.global_batch}, LPL {exp.lpl.enabled}, FSDP over '
    f'{len(devices)} {devices[0].platform} devices, backend={args.backend}',
    flush=True,
  )
  results = {}
  for name in args.order.split(','):
    results[name] = compile_step(experiment(args, name == 'scanned'), mesh, options)
    r = results[name]
    print(
      f'  {name:9s}  trace+lower {r["lower_s"]:7.1f} s  XLA compile {r["xla_s"]:7.1f} s  total {r["total_s"]:7.1f} s'
      f'  ({r["flops"] / 1e12:.2f} TFLOP per device step)',
      flush=True,
    )
    gc.collect()
  unscanned, scanned = results['unscanned']['total_s'], results['scanned']['total_s']
  line = dict(compile_s_unscanned=unscanned, compile_s_scanned=scanned, speedup=unscanned / scanned)
  print(' '.join(f'{k}={v:.2f}' for k, v in line.items()))
  return line


if __name__ == '__main__':
  main()
