"""Cost of the whole LPL term (forward + backward w.r.t. z0_hat): this JAX implementation against PyTorch/diffusers.

For one autoencoder preset with random weights, the JAX side compiles
  `(params, z0_hat, z0) -> value_and_grad_{z0_hat} sum_b lpl_loss(...)[b]`
(params a jit argument, not a constant) for `remat=False` and `remat=True`, and reports the median wall time, XLA's
FLOP count, the compiled temp memory and the residuals saved for the backward pass. The PyTorch side loads the same
weights into diffusers' `AutoencoderKL` (via `save_diffusers` -> `from_pretrained`) and times the independent
implementation in tests/lpl/torch_lpl.py on the same inputs, after checking that both give the same loss and
gradient. The decoder params get no gradient on either side (stop_gradient in JAX, requires_grad=False in PyTorch).

Run from the repository root as a module (it imports tests.lpl.torch_lpl and benchmarks.decoder_features):
  python -m benchmarks.bench_lpl --preset sdxl --resolution 256 --batch 1 --lpl reference
  python -m benchmarks.bench_lpl --preset tiny --resolution 128 --batch 2 --iters 5 --lpl paper
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import diffusers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.decoder_features import MIB, flops_of, fmt, ratio, saved_activation_bytes
from lpl_jax import autoencoder as ae
from lpl_jax import lpl
from tests.lpl import torch_lpl

TORCH_LOSSES = {'reference': torch_lpl.reference_lpl, 'paper': torch_lpl.paper_lpl}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='sdxl', choices=sorted(ae.PRESETS), help='autoencoder preset')
  parser.add_argument('--lpl', default='reference', choices=sorted(TORCH_LOSSES), help='LPL preset')
  parser.add_argument('--resolution', type=int, default=256, help='image side in pixels')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--iters', type=int, default=3, help='timed calls after one warm-up call')
  parser.add_argument(
    '--dtype',
    default='float32',
    choices=['float32', 'bfloat16'],
    help='computation dtype of the JAX side (PyTorch runs in float32)',
  )
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def make_latents(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`(z0_hat, z0)` `[B, h, w, C]` in scaled space; a spike in z0 plants outlier patches in the deep features, so
  the outlier masks (Algorithm 1) have something to remove."""
  rng = np.random.default_rng(seed)
  z0 = rng.normal(size=shape).astype(np.float32)
  if shape[1] > 2 and shape[2] > 5:
    z0[0, 2, 5, :] = 6.0
  z0_hat = (z0 + 0.5 * rng.normal(size=shape)).astype(np.float32)
  return z0_hat, z0


def rel_diff(a: Any, b: Any) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def time_jax(fn, args: tuple, iters: int) -> tuple[dict[str, Any], Any]:
  """Compiles `jit(fn)` once on `args`, warms up, times `iters` calls; returns the stats and the last output."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  mem = compiled.memory_analysis()
  return dict(
    compile_s=compile_s,
    ms=1e3 * statistics.median(times),
    flops=flops_of(compiled),
    temp=getattr(mem, 'temp_size_in_bytes', None),
  ), out


def time_torch(loss_fn, vae, z0_hat: torch.Tensor, z0: torch.Tensor, iters: int) -> tuple[dict[str, Any], Any]:
  """Warms up, then times `iters` forward+backward passes of `loss_fn(vae, z0_hat, z0).sum()` w.r.t. `z0_hat`.

  Returns the stats and `(per-sample loss [B], grad)` of the warm-up call.
  """
  sync = torch.cuda.synchronize if z0_hat.is_cuda else (lambda: None)
  leaf = z0_hat.detach().clone().requires_grad_(True)

  def step():
    leaf.grad = None
    loss = loss_fn(vae, leaf, z0)
    loss.sum().backward()
    sync()
    return loss

  loss = step()
  out = (loss.detach().cpu().numpy(), leaf.grad.detach().cpu().numpy())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return dict(ms=1e3 * statistics.median(times)), out


def load_torch_twin(model: ae.AutoencoderKL, params: Any, device: str):
  """The diffusers model with the same weights, written by `save_diffusers` and read by `from_pretrained`."""
  with tempfile.TemporaryDirectory() as folder:
    ae.save_diffusers(folder, model, params)
    vae = getattr(diffusers, model.config.class_name).from_pretrained(folder, low_cpu_mem_usage=False)
  return vae.eval().requires_grad_(False).to(device)


def _nchw(x: Any) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  model = ae.from_preset(args.preset, dtype=dtype)
  if args.resolution % model.config.downsample_factor:
    raise ValueError(
      f'--resolution={args.resolution} is not a multiple of the downsampling factor '
      f'{model.config.downsample_factor} of preset {args.preset!r}.'
    )
  side = args.resolution // model.config.downsample_factor
  params = jax.jit(lambda k: ae.init_params(model, k))(jax.random.key(args.seed))
  z0_hat_np, z0_np = make_latents((args.batch, side, side, model.config.latent_channels), args.seed + 1)
  z0_hat, z0 = jnp.asarray(z0_hat_np), jnp.asarray(z0_np)
  cfgs = {remat: lpl.LPLConfig.from_preset(args.lpl, remat=remat) for remat in (False, True)}
  torch_device = 'cuda' if torch.cuda.is_available() else 'cpu'

  print(
    f'preset={args.preset} lpl={args.lpl} image={args.batch}x{args.resolution}x{args.resolution} '
    f'latent={tuple(z0.shape)} jax dtype={args.dtype} iters={args.iters} '
    f'params={sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M'
  )
  print(
    f'jax: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax {flax.__version__}'
  )
  print(
    f'torch: {torch_device}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
    f'diffusers {diffusers.__version__}; host {platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} CPUs'
  )

  # Parity first: the per-sample loss of both implementations on the same weights and inputs.
  def per_sample(p, zh, z):
    return lpl.lpl_loss(lpl.make_features_fn(model, p, cfgs[False]), zh, z, cfgs[False])

  jax_loss, aux = jax.jit(per_sample)(params, z0_hat, z0)
  fractions = np.asarray(aux['outlier_fraction']).max(axis=0)
  print('outlier fraction per tap (max over batch): ' + ', '.join(f'{f:.3f}' for f in fractions))

  vae = load_torch_twin(model, params, torch_device)
  zh_t, z_t = (torch.from_numpy(_nchw(x)).to(torch_device) for x in (z0_hat_np, z0_np))
  torch_stats, (torch_loss, torch_grad) = time_torch(TORCH_LOSSES[args.lpl], vae, zh_t, z_t, args.iters)
  print(
    f'loss  JAX {np.array2string(np.asarray(jax_loss), precision=6)}  '
    f'PyTorch {np.array2string(torch_loss, precision=6)}  max rel diff {rel_diff(jax_loss, torch_loss):.1e}'
  )

  results = {}
  for remat, cfg in cfgs.items():

    def total(p, zh, z, cfg=cfg):
      return lpl.lpl_loss(lpl.make_features_fn(model, p, cfg), zh, z, cfg)[0].sum()

    results[remat], (value, grad) = time_jax(jax.value_and_grad(total, argnums=1), (params, z0_hat, z0), args.iters)
    results[remat]['saved'] = saved_activation_bytes(total, (params, z0_hat, z0))
    print(
      f'remat={remat}: sum of loss rel diff {rel_diff(value, torch_loss.sum()):.1e}, '
      f'grad max rel diff {rel_diff(_nchw(grad), torch_grad):.1e}'
    )
  results['torch'] = torch_stats

  header = f'{"impl":<22} {"compile s":>9} {"median ms":>10} {"GFLOP":>9} {"temp MiB":>9} {"resid MiB":>9}'
  print('\n' + header + '\n' + '-' * len(header))
  for name, r in (
    ('JAX remat=False', results[False]),
    ('JAX remat=True', results[True]),
    (f'PyTorch ({torch_device}, float32)', results['torch']),
  ):
    print(
      f'{name:<22} {fmt(r.get("compile_s"), 1, ".1f"):>9} {r["ms"]:>10.1f} {fmt(r.get("flops"), 1e9, ".2f"):>9} '
      f'{fmt(r.get("temp"), MIB, ".1f"):>9} {fmt(r.get("saved"), MIB, ".1f"):>9}'
    )
  print('\nPyTorch time / JAX time:')
  for remat in (False, True):
    print(f'  remat={str(remat):<5} {ratio(torch_stats["ms"], results[remat]["ms"])}')
  on, off = results[True], results[False]
  print(
    f'\nremat / no-remat: time {ratio(on["ms"], off["ms"])}  FLOPs {ratio(on["flops"], off["flops"])}  '
    f'temp memory {ratio(on["temp"], off["temp"])}  residuals {ratio(on["saved"], off["saved"])}'
  )


if __name__ == '__main__':
  main()
