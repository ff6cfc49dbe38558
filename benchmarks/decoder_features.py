"""Cost of decoder feature extraction (the LPL taps), with and without rematerialisation.

For one autoencoder preset with random weights, compiles and times
  fwd:     `z -> [mid, up_0, ..., up_{n-1}]`
  fwd+bwd: `z -> d/dz sum_l mean(f_l ** 2)` (the shape of the LPL gradient w.r.t. the latents)
for `remat=False` and `remat=True` side by side, and prints XLA's FLOP count and memory analysis of each compiled
function next to the median wall time.

Usage:
  python benchmarks/decoder_features.py --preset sdxl --resolution 256 --batch 1
  python benchmarks/decoder_features.py --preset tiny --resolution 128 --batch 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from lpl_jax import autoencoder as ae

MIB = 2.0**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='sdxl', choices=sorted(ae.PRESETS))
  parser.add_argument('--resolution', type=int, default=256, help='image side in pixels')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--num_blocks', type=int, default=None, help='up blocks to run (default: all)')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='computation dtype')
  parser.add_argument('--iters', type=int, default=5, help='timed calls after one warm-up call')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def flops_of(compiled: Any) -> float | None:
  """XLA's FLOP estimate; `cost_analysis()` is a dict in recent JAX and a list of per-module dicts in older ones."""
  costs = compiled.cost_analysis()
  if costs is None:
    return None
  if isinstance(costs, dict):
    costs = [costs]
  values = [c['flops'] for c in costs if c and 'flops' in c]
  return sum(values) if values else None


def measure(fn, args: tuple, iters: int) -> dict[str, Any]:
  """Compiles `fn` on `args`, runs it once to warm up, then times `iters` calls."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  mem = compiled.memory_analysis()
  return dict(
    compile_s=compile_s,
    ms=1e3 * statistics.median(times),
    flops=flops_of(compiled),
    temp=getattr(mem, 'temp_size_in_bytes', None),
    arg=getattr(mem, 'argument_size_in_bytes', None),
    out=getattr(mem, 'output_size_in_bytes', None),
  )


def saved_activation_bytes(fn, args: tuple) -> float | None:
  """Bytes of the residuals JAX saves from the forward pass for the backward pass, excluding the inputs.

  This is what rematerialisation reduces, and what LPL holds per row in a training step while the denoiser's own
  residuals are alive too. It is counted on the jaxpr, before XLA fuses elementwise ops into their consumers, so it
  is an upper bound on what the compiled program stores; the temp-memory column is the compiled peak of this
  isolated function, dominated by the working set of the largest block's backward. Uses JAX's residual
  inspection, which is not public API.
  """
  try:
    from jax._src.ad_checkpoint import saved_residuals
  except ImportError:
    return None
  return float(
    sum(
      aval.size * aval.dtype.itemsize
      for aval, source in saved_residuals(fn, *args)
      if not source.startswith('from the argument')
    )
  )


def fmt(value: float | None, scale: float, spec: str) -> str:
  return 'n/a' if value is None else format(value / scale, spec)


def ratio(a: float | None, b: float | None) -> str:
  return 'n/a' if a is None or not b else f'{a / b:.2f}x'


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  models = {remat: ae.from_preset(args.preset, dtype=dtype, remat=remat) for remat in (False, True)}
  cfg = models[False].config
  if args.resolution % cfg.downsample_factor:
    raise ValueError(
      f'--resolution={args.resolution} is not a multiple of the downsampling factor '
      f'{cfg.downsample_factor} of preset {args.preset!r}.'
    )
  num_blocks = cfg.num_up_blocks if args.num_blocks is None else args.num_blocks
  side = args.resolution // cfg.downsample_factor
  key_params, key_z = jax.random.split(jax.random.key(args.seed))
  # remat only wraps blocks in jax.checkpoint, so both models share one parameter tree.
  params = jax.jit(lambda k: ae.init_params(models[False], k))(key_params)
  z = jax.random.normal(key_z, (args.batch, side, side, cfg.latent_channels), jnp.float32)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  shapes = jax.eval_shape(
    lambda p, z: models[False].apply({'params': p}, z, num_blocks, method=models[False].decoder_features), params, z
  )

  print(
    f'preset={args.preset} image={args.batch}x{args.resolution}x{args.resolution} latent={tuple(z.shape)} '
    f'num_blocks={num_blocks} dtype={args.dtype} iters={args.iters} params={n_params / 1e6:.1f}M'
  )
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  print('features: ' + ', '.join(str(tuple(s.shape)) for s in shapes))

  results = {}
  for remat, model in models.items():

    def features(p, z, model=model):
      return model.apply({'params': p}, z, num_blocks, method=model.decoder_features)

    def loss(p, z, features=features):
      return sum(jnp.mean(jnp.square(f.astype(jnp.float32))) for f in features(p, z))

    for name, fn in (('fwd', features), ('fwd+bwd', jax.grad(loss, argnums=1))):
      results[name, remat] = measure(fn, (params, z), args.iters)
    results['fwd+bwd', remat]['saved'] = saved_activation_bytes(loss, (params, z))

  header = (
    f'{"function":<9} {"remat":<6} {"compile s":>9} {"median ms":>10} {"GFLOP":>9} {"temp MiB":>9} '
    f'{"args MiB":>9} {"out MiB":>8} {"resid MiB":>9}'
  )
  print('\n' + header + '\n' + '-' * len(header))
  for name, remat in sorted(results, key=lambda k: (k[0] != 'fwd', k[1])):
    r = results[name, remat]
    print(
      f'{name:<9} {str(remat):<6} {r["compile_s"]:>9.1f} {r["ms"]:>10.1f} {fmt(r["flops"], 1e9, ".2f"):>9} '
      f'{fmt(r["temp"], MIB, ".1f"):>9} {fmt(r["arg"], MIB, ".1f"):>9} {fmt(r["out"], MIB, ".1f"):>8} '
      f'{fmt(r.get("saved"), MIB, ".1f"):>9}'
    )
  print('\nremat / no-remat:')
  for name in ('fwd', 'fwd+bwd'):
    on, off = results[name, True], results[name, False]
    print(
      f'  {name:<8} time {ratio(on["ms"], off["ms"])}  FLOPs {ratio(on["flops"], off["flops"])}  '
      f'temp memory {ratio(on["temp"], off["temp"])}'
      + (f'  saved activations {ratio(on["saved"], off["saved"])}' if name == 'fwd+bwd' else '')
    )


if __name__ == '__main__':
  main()
