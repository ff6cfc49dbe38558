"""FLOPs and compiled memory of the paper-scale LPL train step per remat policy, of the denoiser and of the LPL
decoder branch (`model.remat_policy`, `lpl.remat_policy`; `lpl_jax.models.layers.REMAT_POLICIES`).

The step is `configs/imagenet.py:post512,lpl` (MMDiT 28 x 1536 with its blocks scanned, the asymmetric autoencoder's
decoder in the LPL branch, bf16 compute, AdamW + EMA) with FSDP over 8 simulated CPU devices and `--batch` rows per
device (16, the paper's per-GPU batch, Table 7), lowered from abstract inputs by the trainer's own
`lpl_jax.train.build.lower_train_step` and compiled once per policy (`none` = `model.remat=False`), the other branch's
policy held at the config's.

Memory, per device, from XLA's buffer assignment (`compiled.memory_analysis()`): arguments (state, batch, autoencoder
params), outputs, temp (the peak of live intermediates) and peak = arguments + outputs - aliased (donated) + temp.
It is the CPU compiler's schedule and fusion, not a TPU's or GPU's, and ignores fragmentation.

FLOPs, per device and step, from XLA's cost analysis, which counts the body of a while loop once: the scanned blocks'
forward and backward loops (`depth - 1` trips) and the LPL branch's loop over its chunks (`lpl_rows / lpl.chunk`
trips) are added back with the FLOPs of one block's forward + backward (with its remat recomputation) and of one
chunk's LPL value and gradient, each compiled alone with the step's shapes: total = step + (trips - 1) x body.

Usage (from the repository root; about 10 minutes on 2 CPU cores):
  python -m benchmarks.remat_policies
  python -m benchmarks.remat_policies --depth=8 --batch=8
"""

from __future__ import annotations

import os

# Eight simulated devices for the FSDP mesh; must be set before jax is imported.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import argparse
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from lpl_jax import autoencoder as ae_lib
from lpl_jax import lpl as lpl_lib
from lpl_jax.models import DiTBlock, MMDiTBlock, scan
from lpl_jax.models.layers import REMAT_POLICIES
from lpl_jax.train import build, sharding
from lpl_jax.train.config import DTYPES, Experiment, autoencoder_config, latent_shape, lpl_config, step_config

# The programs are only analysed, never run: cheap LLVM code generation (the cost and memory analyses are made on
# the optimised HLO before it; benchmarks/lpl_overhead.py).
ANALYSIS_ONLY = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
GIB, TFLOP = 2.0**30, 1e12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='post512,lpl', help='variant of configs/imagenet.py')
  parser.add_argument('--depth', type=int, default=0, help="denoiser blocks (0: the config's, 28)")
  parser.add_argument('--batch', type=int, default=16, help='rows per device')
  parser.add_argument('--devices', type=int, default=8, help='FSDP degree (simulated CPU devices, at most 8)')
  parser.add_argument('--denoiser', default='none,' + ','.join(REMAT_POLICIES), help='denoiser policies')
  parser.add_argument('--lpl', default=','.join(REMAT_POLICIES), help='LPL decoder branch policies')
  return parser.parse_args(argv)


def experiment(args: argparse.Namespace, **overrides: Any) -> Experiment:
  from configs import imagenet

  c = imagenet.get_config(args.config)
  c.mesh.fsdp, c.mesh.shard_params = args.devices, True
  c.data.global_batch = args.batch * args.devices
  c.model.scan_layers = True
  if args.depth:
    c.model.depth = args.depth
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return Experiment.from_config_dict(c)


def memory_of(compiled: Any) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = dict(
    arg=m.argument_size_in_bytes, out=m.output_size_in_bytes, alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes
  )
  out['peak'] = out['arg'] + out['out'] - out['alias'] + out['temp']
  return out


def while_loops(compiled: Any) -> list[str]:
  """Trip counts of the while loops in the optimised HLO ('?' where XLA does not know it)."""
  lines = [line for line in compiled.as_text().splitlines() if re.search(r'\) while\(', line)]
  return [m.group(1) if (m := re.search(r'"known_trip_count":\{"n":"(\d+)"', line)) else '?' for line in lines]


def flops_of(compiled: Any) -> float:
  return float((compiled.cost_analysis() or {}).get('flops', float('nan')))


def block_flops(exp: Experiment, batch: int) -> float:
  """Forward + backward (with the remat recomputation) of one scanned block on `batch` rows, per device."""
  m = build.make_denoiser(exp, latent_shape(exp)[-1])
  cls = DiTBlock if exp.model.kind == 'dit' else MMDiTBlock
  block_cls = scan.block_class(cls, remat=m.remat, policy=m.remat_policy, scanned=True)
  kw = dict(dtype=m.dtype, modulation=m.modulation)
  side = latent_shape(exp)[0] // m.patch_size
  d = m.hidden_size
  x = jax.ShapeDtypeStruct((batch, side * side, d), jnp.float32)
  c = jax.ShapeDtypeStruct((batch, d), jnp.float32)
  c = [c] * 6 if m.modulation == 'single' else c
  if cls is DiTBlock:
    block, args = block_cls(d, m.num_heads, m.mlp_ratio, **kw), (x, c)
  else:
    ctx_len = exp.model.context_len if exp.model.text else m.num_class_tokens
    ctx = jax.ShapeDtypeStruct((batch, ctx_len, d), jnp.float32)
    block, args = block_cls(d, m.num_heads, m.mlp_ratio, m.qk_norm, **kw), (x, ctx, c)
  params = jax.eval_shape(lambda *a: block.init(jax.random.key(0), *a)['params'], *args)
  loss = lambda p, *a: sum(jnp.sum(o) for o in jax.tree.leaves(block.apply({'params': p}, *a)))
  grad = jax.value_and_grad(loss, argnums=tuple(range(len(args) + 1)))
  return flops_of(jax.jit(grad).lower(params, *args).compile(compiler_options=ANALYSIS_ONLY))


def lpl_chunk_flops(exp: Experiment, rows: int) -> float:
  """One chunk of the LPL branch (`rows` rows): the loss and its gradient to `z0_hat`, the decoder rematerialised
  with the config's policy."""
  cfg = lpl_config(exp.lpl)
  ae_model = ae_lib.AutoencoderKL(autoencoder_config(exp.autoencoder), dtype=DTYPES[exp.autoencoder.dtype])
  params = jax.eval_shape(lambda k: ae_lib.init_params(ae_model, k), jax.random.key(0))
  z = jax.ShapeDtypeStruct((rows, *latent_shape(exp)), jnp.float32)

  def loss(zh, z0, p):
    return jnp.sum(lpl_lib.lpl_loss(lpl_lib.make_features_fn(ae_model, p, cfg), zh, z0, cfg)[0])

  return flops_of(jax.jit(jax.value_and_grad(loss)).lower(z, z, params).compile(compiler_options=ANALYSIS_ONLY))


def measure(args: argparse.Namespace, mesh, **overrides: Any) -> dict[str, Any]:
  exp = experiment(args, **overrides)
  start = time.perf_counter()
  compiled = build.lower_train_step(exp, mesh).compile(compiler_options=ANALYSIS_ONLY)
  seconds = time.perf_counter() - start
  cfg = step_config(exp, num_devices=mesh.size)
  lpl_rows = cfg.lpl_rows_per_group  # one group per device (lpl.groups=0, no accumulation)
  chunk = cfg.lpl_chunk or lpl_rows
  trips = build.make_denoiser(exp, 4).scanned_depth
  body, chunk_body = block_flops(exp, args.batch), lpl_chunk_flops(exp, chunk) if lpl_rows else 0.0
  total = flops_of(compiled) + (trips - 1) * body + max(lpl_rows // chunk - 1, 0) * chunk_body
  return dict(
    loops=while_loops(compiled),
    mem=memory_of(compiled),
    flops=total,
    block=body,
    chunk=chunk_body,
    compile_s=seconds,
    lpl_rows=lpl_rows,
    lpl_chunk=chunk,
  )


def table(title: str, rows: dict[str, dict[str, Any]], body: str) -> str:
  base = rows.get('full') or next(iter(rows.values()))
  lines = [
    f'{title}',
    '',
    f'| policy | {body} GFLOP | step TFLOP | vs full | arguments GiB | outputs GiB | temp GiB | peak GiB |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  key = 'block' if body.startswith('block') else 'chunk'
  for name, r in rows.items():
    m = r['mem']
    lines.append(
      f'| {name} | {r[key] / 1e9:,.0f} | {r["flops"] / TFLOP:.2f} | {r["flops"] / base["flops"]:.3f} | '
      f'{m["arg"] / GIB:.2f} | {m["out"] / GIB:.2f} | {m["temp"] / GIB:.2f} | {m["peak"] / GIB:.2f} |'
    )
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
  args = parse_args(argv)
  jax.config.update('jax_enable_compilation_cache', False)
  devices = jax.devices()[: args.devices]
  mesh = sharding.make_mesh(1, args.devices, devices=devices)
  exp = experiment(args)
  m = exp.model
  print(
    f'imagenet.py:{args.config}: {m.kind} {m.depth} x {m.hidden_size} (scanned), {exp.data.resolution} px, '
    f'{args.batch} rows per device, FSDP over {len(devices)} {devices[0].platform} devices; held policies: '
    f'model {m.remat_policy}, lpl {exp.lpl.remat_policy}',
    flush=True,
  )
  denoiser, decoder = {}, {}
  for name in args.denoiser.split(','):
    over = {'model.remat': False} if name == 'none' else {'model.remat': True, 'model.remat_policy': name}
    denoiser[name] = r = measure(args, mesh, **over)
    print(f'  denoiser {name:34s} compiled in {r["compile_s"]:5.0f} s, loops {r["loops"]}', flush=True)
  for name in [n for n in args.lpl.split(',') if n]:
    decoder[name] = r = measure(args, mesh, **{'lpl.remat': True, 'lpl.remat_policy': name})
    print(f'  lpl      {name:34s} compiled in {r["compile_s"]:5.0f} s, loops {r["loops"]}', flush=True)
  print()
  print(table('Denoiser (`model.remat_policy`; none: `model.remat=False`), per device:', denoiser, 'block fwd+bwd'))
  if decoder:
    r = next(iter(decoder.values()))
    print()
    print(
      table(
        f'LPL decoder branch (`lpl.remat_policy`; {r["lpl_rows"]} LPL rows per device in chunks of {r["lpl_chunk"]}), '
        'per device:',
        decoder,
        'chunk value+grad',
      )
    )
  return dict(denoiser=denoiser, lpl=decoder)


if __name__ == '__main__':
  main()
