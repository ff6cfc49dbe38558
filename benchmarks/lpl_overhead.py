"""What LPL costs in the training step: FLOPs and memory at paper scale, wall time on a small config.

Part 1 (paper scale, nothing materialised): the ImageNet configs' class-conditional denoiser (configs/imagenet.py:
the MMDiT of 28 blocks, width 1536, patch 2; bf16 compute, float32 master weights, per-block remat; `--kind` and
`--modulation` choose another architecture of that size, e.g. `--kind=dit --modulation=single`, adaLN-single) with
an SD-family autoencoder (decoder remat via `LPLConfig.remat`), DDPM-eps with the SD quadratic schedule, per-device
batch 16, FSDP over 8 simulated CPU devices. The step of `lpl_jax.train` is lowered and compiled from
`jax.ShapeDtypeStruct` inputs (state, batch and autoencoder params from `jax.eval_shape`, with their shardings) with
LPL and without (`lpl=None`), and XLA's `cost_analysis()` and `memory_analysis()` of the per-device SPMD program are
reported.

Part 2 (real steps): a small DiT and the `tiny` autoencoder on one CPU device, with and without LPL, compiled,
warmed up, then timed alternately; medians and their ratio.

The last line is machine-readable:
  flops_ratio_512=<x> mem_ratio_512=<y> fits_32gb_512=<yes|no> step_time_ratio_cpu=<z>

Usage (from the repository root):
  python -m benchmarks.lpl_overhead                       # 256 and 512 px, chunk study at 512, CPU timing
  python -m benchmarks.lpl_overhead --quick               # 256 px only with a 4-block MMDiT, short timing
  python -m benchmarks.lpl_overhead --resolutions 512 --chunks 0,2 --ae sdxl --no_timing
  python -m benchmarks.lpl_overhead --kind=dit --modulation=single --no_timing   # the 812M adaLN-single DiT
"""

from __future__ import annotations

import os

# Eight simulated devices for the FSDP mesh; must be set before jax is imported.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import argparse
import re
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.decoder_features import flops_of, fmt, ratio
from lpl_jax import autoencoder as ae
from lpl_jax import diffusion, lpl, train
from lpl_jax.models import DiT
from lpl_jax.train import build
from lpl_jax.train.config import MODEL_KINDS, Experiment

GIB = 2.0**30
TFLOP = 1e12
# Accelerator memory sizes to check, in GiB: HBM comes in powers of two (a "32 GB" V100 or TPU v4 holds 32 GiB).
CAPACITIES_GB = (16, 32, 95)
# The paper's own numbers (appendix A.4 Table 5, A.6 Table 8), printed next to ours.
# Part 1's programs are only analysed, never run: cheap LLVM code generation. The cost and memory analyses are made
# on the optimised HLO before code generation, so they are the same with and without these options (checked on a
# 4-block model: identical FLOPs and buffer sizes); compile time drops by half or more.
ANALYSIS_ONLY = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
PAPER = dict(flops_ratio_512=106.581 / 69.342, mem_no_lpl=42.5, mem_lpl=74.3, throughput_drop=0.42)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--resolutions', default='256,512', help='image sides in pixels, comma-separated')
  parser.add_argument('--ae', default='sdxl', choices=sorted(ae.PRESETS), help='autoencoder preset (part 1)')
  model = imagenet_model()
  parser.add_argument(
    '--kind', default=model.kind, choices=MODEL_KINDS, help="denoiser (default: the ImageNet configs')"
  )
  parser.add_argument(
    '--modulation',
    default=model.modulation,
    choices=('block', 'single'),
    help="adaLN per block, or adaLN-single (one shared Linear, a table per block); default: the ImageNet configs'",
  )
  parser.add_argument('--depth', type=int, default=model.depth, help='denoiser blocks (28 = the paper model)')
  parser.add_argument(
    '--compile_depths',
    default='2,4',
    help='two denoiser depths that are actually compiled; the '
    'numbers at --depth are extrapolated linearly from them (blocks are identical and unrolled). '
    'Give --compile_depths=28 to compile the full model (about 5 minutes per config on 2 cores)',
  )
  parser.add_argument('--batch', type=int, default=16, help='per-device batch')
  parser.add_argument('--devices', type=int, default=8, help='FSDP degree (simulated CPU devices, at most 8)')
  parser.add_argument(
    '--tau', type=float, default=None, help="noise-level threshold at 256 px (default: the 'paper' preset)"
  )
  parser.add_argument(
    '--chunks',
    default='0,1,2',
    help='lpl_chunk values compiled at the largest resolution for the '
    'memory study (0 = all LPL rows at once, always compiled)',
  )
  parser.add_argument('--timing_side', type=int, default=8, help='latent side of the real-step timing (part 2)')
  parser.add_argument('--timing_iters', type=int, default=5, help='timed steps per config (part 2)')
  parser.add_argument('--no_timing', action='store_true', help='skip part 2')
  parser.add_argument('--quick', action='store_true', help='256 px, 4-block MMDiT, no chunk study, 3 timed steps')
  args = parser.parse_args(argv)
  if args.quick:
    args.resolutions, args.depth, args.compile_depths, args.chunks, args.timing_iters = '256', 4, '4', '0', 3
  args.resolutions = [int(r) for r in args.resolutions.split(',')]
  args.chunks = sorted({0, *(int(c) for c in args.chunks.split(','))})
  args.compile_depths = sorted({int(d) for d in args.compile_depths.split(',')})
  if args.depth not in args.compile_depths and len(args.compile_depths) != 2:
    parser.error('--compile_depths: give the target --depth itself, or two depths to extrapolate from.')
  return args


# ------------------------------------------------------------------------------------------------------------------
# Part 1: compiled step at paper scale from abstract inputs.


def imagenet_config():
  """The ImageNet configs' experiment (post-training with LPL at 512 px); part 1 takes its `model` section."""
  from configs import imagenet

  return imagenet.get_config('post512,lpl')


def imagenet_model():
  return imagenet_config().model


def denoiser(args, depth: int) -> nn.Module:
  """The ImageNet configs' denoiser as the trainer builds it (`build.make_denoiser`), with `--kind`, `--modulation`
  and `depth` blocks."""
  exp = Experiment.from_config_dict(imagenet_config())
  # Unrolled blocks: XLA's cost analysis counts a loop body once, and the depths are extrapolated from.
  exp = exp.replace(model=dict(kind=args.kind, modulation=args.modulation, depth=depth, scan_layers=False))
  return build.make_denoiser(exp, latent_channels=4)


def step_config(
  resolution: int, batch: int, *, lpl_on: bool, chunk: int, tau: float | None, num_classes: int
) -> train.StepConfig:
  form = diffusion.get_formulation('ddpm_eps')  # SD quadratic ("scaled_linear") schedule, as in the paper
  sampler = diffusion.TimestepSampler(num_timesteps=1000)
  lcfg, k = None, 0
  if lpl_on:
    lcfg = lpl.LPLConfig.from_preset('paper', **({} if tau is None else {'tau': tau}))
    k = sampler.split(form, lpl.noise_level_threshold(lcfg, resolution), batch)
  return train.StepConfig(
    form,
    sampler,
    train.OptimConfig(ema_decay=0.99975 if lpl_on else 0.9999),
    lpl=lcfg,
    lpl_rows_per_group=k,
    lpl_chunk=chunk,
    null_class=num_classes,
  )


def abstract_inputs(
  args, model: nn.Module, optimizer, mesh, *, resolution: int, ae_model: ae.AutoencoderKL | None
) -> build.AbstractStep:
  """The trainer's abstract step inputs (`build.abstract_step`, sharded `ShapeDtypeStruct`s from `jax.eval_shape`)
  for the ImageNet experiment at `resolution` with `args.batch` rows per device and FSDP over the mesh; the
  autoencoder params cut to what the LPL reads (the encoder is not needed when training on cached latents)."""
  exp = Experiment.from_config_dict(imagenet_config()).replace(
    data={'resolution': resolution, 'global_batch': args.batch * mesh.size},
    autoencoder={'preset': args.ae},
    mesh={'data': 1, 'fsdp': mesh.size, 'shard_params': True},
  )
  used = {}
  if ae_model is not None:
    full = jax.eval_shape(lambda k: ae.init_params(ae_model, k), jax.random.key(1))
    used = {k: v for k, v in full.items() if k in ('decoder', 'post_quant_conv')}
  return build.abstract_step(exp, model, ae_model, optimizer, mesh, ae_params=used)


def while_loops(compiled: Any) -> list[str]:
  """Trip counts of the while loops in the optimised HLO ('?' where XLA does not know it)."""
  text = compiled.as_text()
  loops = [line for line in text.splitlines() if re.search(r'\) while\(', line)]
  counts = []
  for line in loops:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    counts.append(m.group(1) if m else '?')
  return counts


def memory_of(compiled: Any) -> dict[str, float]:
  """Per-device bytes from XLA's buffer assignment.

  peak = arguments + outputs - aliased + temp: arguments (state, batch, autoencoder params) live for the whole step,
  outputs that are not donated input buffers (`alias`: the new state reuses the old one) come on top, and `temp` is
  the size of the single scratch allocation that XLA's heap simulation lays out for every intermediate of the
  scheduled program, i.e. its peak of live intermediates. It ignores allocator fragmentation and runtime
  workspace, and it is the CPU compiler's schedule and fusion, not a GPU's or TPU's.
  """
  m = compiled.memory_analysis()
  out = dict(
    arg=m.argument_size_in_bytes, out=m.output_size_in_bytes, alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes
  )
  out['peak'] = out['arg'] + out['out'] - out['alias'] + out['temp']
  return out


def compile_step(resolution: int, args, mesh, *, lpl_on: bool, chunk: int = 0, depth: int) -> dict[str, Any]:
  model = denoiser(args, depth)
  ae_model = ae.from_preset(args.ae, dtype=jnp.bfloat16) if lpl_on else None  # remat comes from LPLConfig.remat
  cfg = step_config(resolution, args.batch, lpl_on=lpl_on, chunk=chunk, tau=args.tau, num_classes=model.num_classes)
  optimizer = train.make_optimizer(cfg.optim)
  inputs = abstract_inputs(args, model, optimizer, mesh, resolution=resolution, ae_model=ae_model)
  step = train.jit_train_step(
    inputs.state_shardings, mesh, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model
  )
  start = time.perf_counter()
  compiled = step.lower(inputs.state, inputs.batch, inputs.ae_params).compile(compiler_options=ANALYSIS_ONLY)
  seconds = time.perf_counter() - start
  print(
    f'  compiled {resolution} px depth {depth} {"LPL lpl_chunk=" + str(chunk) if lpl_on else "w/o LPL"} in '
    f'{seconds:.0f} s',
    flush=True,
  )
  n_params = sum(x.size for x in jax.tree.leaves(inputs.state.params))
  return dict(
    compiled=compiled,
    compile_s=seconds,
    flops=flops_of(compiled),
    mem=memory_of(compiled),
    loops=while_loops(compiled),
    k=cfg.lpl_rows_per_group,
    params=n_params,
    cfg=cfg,
  )


def compile_lpl_piece(resolution: int, args, k: int, *, grad: bool) -> dict[str, Any]:
  """The LPL term alone on this device's K rows (one device): `value_and_grad` w.r.t. `z0_hat` (target branch
  forward, prediction branch forward + backward with the decoder remat of the step), or the forward only."""
  side = resolution // 8
  ae_model = ae.from_preset(args.ae, dtype=jnp.bfloat16)
  lcfg = lpl.LPLConfig.from_preset('paper', **({} if args.tau is None else {'tau': args.tau}))
  params = jax.eval_shape(lambda key: ae.init_params(ae_model, key), jax.random.key(1))
  z = jax.ShapeDtypeStruct((k, side, side, 4), jnp.float32)

  def total(zh, z0, p):
    return lpl.lpl_loss(lpl.make_features_fn(ae_model, p, lcfg), zh, z0, lcfg)[0].sum()

  fn = jax.value_and_grad(total) if grad else total
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(z, z, params).compile(compiler_options=ANALYSIS_ONLY)
  return dict(flops=flops_of(compiled), compile_s=time.perf_counter() - start, loops=while_loops(compiled))


def extrapolate(results: dict[int, dict[str, Any]], lo: int, hi: int, depth: int) -> dict[str, Any]:
  """FLOPs and buffer sizes at `depth`, linear in the number of blocks through the compiled depths `lo`, `hi`."""
  if depth in results:
    return results[depth]
  a, b = results[lo], results[hi]
  w = (depth - lo) / (hi - lo)
  line = lambda x, y: x + w * (y - x)
  return dict(
    b,
    flops=line(a['flops'], b['flops']),
    params=line(a['params'], b['params']),
    mem={key: line(a['mem'][key], b['mem'][key]) for key in b['mem']},
    compile_s=a['compile_s'] + b['compile_s'],
  )


def fits(peak: float) -> str:
  return ' '.join(f'{c}GB:{"yes" if peak <= c * GIB else "no"}' for c in CAPACITIES_GB)


def paper_scale(args) -> dict[int, dict[str, Any]]:
  mesh = train.make_mesh(1, args.devices, devices=jax.devices()[: args.devices])
  how = (
    'compiled'
    if args.depth in args.compile_depths
    else f'extrapolated linearly from depths {args.compile_depths[0]} and {args.compile_depths[-1]}'
  )
  m = denoiser(args, args.depth)
  print(
    f'== Part 1: compiled step, {type(m).__name__} ({args.modulation} modulation) depth {args.depth} ({how}) width '
    f'{m.hidden_size} patch {m.patch_size} (bf16 compute, f32 params, remat), '
    f'autoencoder {args.ae!r} (bf16, decoder remat), per-device batch {args.batch}, FSDP over {mesh.size} '
    f'simulated devices (global batch {args.batch * mesh.size}), DDPM-eps, uniform t, LPL preset "paper"'
  )
  results = {}
  for res in args.resolutions:
    r = results[res] = {}
    lo, hi = args.compile_depths[0], args.compile_depths[-1]
    offs = {d: compile_step(res, args, mesh, lpl_on=False, depth=d) for d in {lo, hi}}
    r['off'] = extrapolate(offs, lo, hi, args.depth)
    chunks = args.chunks if res == max(args.resolutions) else [0]
    for chunk in chunks:
      # LPL adds the same work and buffers at any depth (it sees only z0_hat): add its increment at the compiled
      # depth to the extrapolated w/o-LPL step.
      on = compile_step(res, args, mesh, lpl_on=True, chunk=chunk, depth=hi)
      r[chunk] = dict(
        on,
        flops=r['off']['flops'] + on['flops'] - offs[hi]['flops'],
        mem={key: r['off']['mem'][key] + on['mem'][key] - offs[hi]['mem'][key] for key in on['mem']},
        compile_s=on['compile_s'],
      )
    k = r[0]['k']
    r['piece'] = compile_lpl_piece(res, args, k, grad=True)
    r['piece_fwd'] = compile_lpl_piece(res, args, k, grad=False)
    lcfg = r[0]['cfg'].lpl
    print(
      f'\n-- {res} px: latents {res // 8}x{res // 8}x4, tau {lcfg.tau} at 256 px -> threshold '
      f'{lpl.noise_level_threshold(lcfg, res):g} at {res} px, K = {k} of {args.batch} rows per device below it; '
      f'denoiser {r["off"]["params"] / 1e9:.3f}B params'
    )
    header = (
      f'{"config":<22} {"compile s":>9} {"TFLOP/dev":>10} {"TFLOP tot":>10} {"args GiB":>9} {"out GiB":>8} '
      f'{"alias GiB":>9} {"temp GiB":>9} {"peak GiB":>9}  {"while loops (trip counts)":<26} fits'
    )
    print(header + '\n' + '-' * len(header))
    rows = [('w/o LPL', r['off'])] + [(f'LPL lpl_chunk={c or "0 (all K)"}', r[c]) for c in chunks]
    for name, x in rows:
      m = x['mem']
      print(
        f'{name:<22} {x["compile_s"]:>9.1f} {fmt(x["flops"], TFLOP, ".2f"):>10} '
        f'{fmt(x["flops"] * mesh.size, TFLOP, ".1f"):>10} {m["arg"] / GIB:>9.2f} {m["out"] / GIB:>8.2f} '
        f'{m["alias"] / GIB:>9.2f} {m["temp"] / GIB:>9.2f} {m["peak"] / GIB:>9.2f}  '
        f'{(",".join(x["loops"]) or "none"):<26} {fits(m["peak"])}'
      )
    for name, key in (('LPL piece fwd+bwd (K rows, 1 dev)', 'piece'), ('LPL piece fwd only', 'piece_fwd')):
      x = r[key]
      print(
        f'{name:<34} compile {x["compile_s"]:.1f} s, {fmt(x["flops"], TFLOP, ".3f")} TFLOP, loops '
        f'{",".join(x["loops"]) or "none"}'
      )
    report_resolution(r, args, chunks, mesh.size)
  return results


def report_resolution(r: dict[str, Any], args, chunks: list[int], n_dev: int) -> None:
  off, on = r['off'], r[0]
  f_off, f_on, f_piece, f_fwd = off['flops'], on['flops'], r['piece']['flops'], r['piece_fwd']['flops']
  ideal = (f_off + f_piece) / f_off
  measured = f_on / f_off
  extra = f_on - f_off - f_piece
  print(
    f'FLOPs: LPL / w/o LPL = {measured:.3f}x (lpl_chunk=0: the LPL map has one iteration, so the count is '
    f"exact); ideal (w/o LPL + K/B of the LPL term's fwd+bwd, nothing on rows above the threshold) = "
    f'{ideal:.3f}x; measured is {100 * (measured / ideal - 1):+.1f}% from ideal.'
  )
  print(
    f'  the step spends {extra / TFLOP:.2f} TFLOP/device beyond w/o LPL + piece; one forward of the LPL term '
    f'(both decoder branches, K rows) is {f_fwd / TFLOP:.2f} TFLOP: ratio {extra / f_fwd:.2f}'
  )
  for c in chunks:
    if not c:
      continue
    x = r[c]
    n = on['k'] // c
    corrected = f_off + n * (x['flops'] - f_off)
    print(
      f'  lpl_chunk={c}: XLA counts {x["flops"] / TFLOP:.2f} TFLOP/device, but the LPL runs in while loops of '
      f'{n} iterations counted once; {n} x the loop part gives {corrected / TFLOP:.2f} TFLOP '
      f'({corrected / f_on:.3f}x the lpl_chunk=0 count)'
    )
  print(
    f'Memory: peak per device LPL / w/o LPL = {on["mem"]["peak"] / off["mem"]["peak"]:.2f}x (lpl_chunk=0)'
    + ''.join(f', {r[c]["mem"]["peak"] / off["mem"]["peak"]:.2f}x (lpl_chunk={c})' for c in chunks if c)
  )
  # Where it goes: the extra temp memory per row that the decoder works on at once (all K rows, or one chunk).
  for c in chunks:
    rows = c or on['k']
    print(
      f'  lpl_chunk={c}: temp {r[c]["mem"]["temp"] / GIB:.2f} GiB = w/o LPL {off["mem"]["temp"] / GIB:.2f} + '
      f'{(r[c]["mem"]["temp"] - off["mem"]["temp"]) / GIB:.2f} GiB for {rows} rows decoded at once '
      f'({(r[c]["mem"]["temp"] - off["mem"]["temp"]) / rows / GIB:.2f} GiB/row); args +'
      f'{(r[c]["mem"]["arg"] - off["mem"]["arg"]) / GIB:.2f} GiB (autoencoder decoder params, replicated)'
    )


# ------------------------------------------------------------------------------------------------------------------
# Part 2: real steps on a small config.


def cpu_timing(args) -> float:
  """Times real steps; the denoiser is sized so that its share of the step is not negligible next to the decoder."""
  side, batch, classes = args.timing_side, 16, 10
  model = DiT(patch_size=2, hidden_size=256, depth=6, num_heads=4, num_classes=classes, in_channels=4)
  ae_model = ae.from_preset('tiny')
  ae_params = jax.jit(lambda k: ae.init_params(ae_model, k))(jax.random.key(9))
  mesh = train.make_mesh(1, 1, devices=jax.devices()[:1])
  data = {
    'latents': jax.random.normal(jax.random.key(1), (batch, side, side, 4)),
    'labels': jnp.arange(batch, dtype=jnp.int32) % classes,
  }
  steps, states, flops = {}, {}, {}
  dummy = jnp.zeros((1, side, side, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)

  def init_params(key):
    return model.init(key, *dummy)['params']

  print(
    f'\n== Part 2: real steps on CPU (1 device): DiT hidden 256 depth 6 patch 2, autoencoder "tiny" (decoder '
    f'remat), latents {batch}x{side}x{side}x4 ({side * 8} px), float32, lpl_chunk=0'
  )
  for name, lpl_on in (('w/o LPL', False), ('LPL', True)):
    cfg = step_config(side * 8, batch, lpl_on=lpl_on, chunk=0, tau=args.tau, num_classes=classes)
    optimizer = train.make_optimizer(cfg.optim)
    state, shardings = train.init_state(init_params, optimizer, jax.random.key(0), mesh, fsdp=False)
    step = train.jit_train_step(
      shardings, mesh, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model if lpl_on else None
    )
    start = time.perf_counter()
    compiled = step.lower(state, data, ae_params if lpl_on else {}).compile()
    state, metrics = compiled(state, data, ae_params if lpl_on else {})
    jax.block_until_ready(metrics)
    flops[name] = flops_of(compiled)
    print(
      f'  {name}: K = {cfg.lpl_rows_per_group} of {batch} rows, compile + first step '
      f'{time.perf_counter() - start:.1f} s, '
      f'{fmt(flops[name], 1e9, ".1f")} GFLOP/step'
    )
    steps[name], states[name] = compiled, state
  times = {name: [] for name in steps}
  for _ in range(args.timing_iters):  # alternate so that load from other processes hits both alike
    for name, step in steps.items():
      start = time.perf_counter()
      states[name], metrics = step(states[name], data, ae_params if name == 'LPL' else {})
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
  for name, v in times.items():
    print(f'  {name:<8} median {ms[name]:8.1f} ms over {len(v)} steps (min {1e3 * min(v):.1f}, max {1e3 * max(v):.1f})')
  step_ratio = ms['LPL'] / ms['w/o LPL']
  print(
    f'  step time LPL / w/o LPL = {step_ratio:.2f}x (throughput -{100 * (1 - 1 / step_ratio):.0f}%), XLA FLOPs '
    f'ratio of the same two steps {ratio(flops["LPL"], flops["w/o LPL"])}; paper, asymmetric AE at 512 px on '
    f'GPUs: throughput -{100 * PAPER["throughput_drop"]:.0f}%'
  )
  return step_ratio


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  print(
    f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; XLA cost and memory '
    'analysis of the CPU compiler (FLOPs and memory are per device of the SPMD program)'
  )
  results = paper_scale(args)
  largest = max(args.resolutions)
  r = results[largest]
  flops_ratio = r[0]['flops'] / r['off']['flops']
  mem_ratio = r[0]['mem']['peak'] / r['off']['mem']['peak']
  best_chunk = min(args.chunks, key=lambda c: r[c]['mem']['peak'])
  print(
    f'\n== Summary at {largest} px (paper anchors: FLOPs/iteration {PAPER["flops_ratio_512"]:.2f}x at 512 px, '
    f'GPU memory {PAPER["mem_no_lpl"]}% -> {PAPER["mem_lpl"]}% of 80 GB = '
    f'{PAPER["mem_lpl"] / PAPER["mem_no_lpl"]:.2f}x, throughput -{100 * PAPER["throughput_drop"]:.0f}%)'
  )
  ideal = (r['off']['flops'] + r['piece']['flops']) / r['off']['flops']
  print(
    f'  FLOPs ratio {flops_ratio:.3f}x vs ideal {ideal:.3f}x: '
    f'{"met" if abs(flops_ratio / ideal - 1) <= 0.05 else "MISSED"} (target: within 5%)'
  )
  best_ratio = r[best_chunk]['mem']['peak'] / r['off']['mem']['peak']
  print(
    f'  peak memory ratio {mem_ratio:.2f}x at lpl_chunk=0: {"met" if mem_ratio <= 1.2 else "MISSED"}; '
    f'{best_ratio:.2f}x at lpl_chunk={best_chunk}: {"met" if best_ratio <= 1.2 else "MISSED"} (target: <= 1.2x)'
  )
  peak, best_peak = r[0]['mem']['peak'], r[best_chunk]['mem']['peak']
  fits_32 = best_peak <= 32 * GIB
  print(
    f'  LPL step peak per device {peak / GIB:.1f} GiB at lpl_chunk=0 ({fits(peak)}), {best_peak / GIB:.1f} GiB '
    f'at lpl_chunk={best_chunk} ({fits(best_peak)}); w/o LPL {r["off"]["mem"]["peak"] / GIB:.1f} GiB: fits 32 GiB '
    f"{'met' if fits_32 else 'MISSED'} at lpl_chunk={best_chunk} (the paper configs' setting is lpl_chunk=1)"
  )
  print(f"  (the machine-readable line reports lpl_chunk={best_chunk}; memory is the CPU compiler's plan)")
  step_ratio = float('nan') if args.no_timing else cpu_timing(args)
  print(
    f'flops_ratio_{largest}={flops_ratio:.3f} mem_ratio_{largest}={best_ratio:.3f} '
    f'fits_32gb_{largest}={"yes" if fits_32 else "no"} step_time_ratio_cpu={step_ratio:.3f}'
  )


if __name__ == '__main__':
  main()
