"""Shared fixtures: small diffusers autoencoders with random weights, saved in diffusers' own format."""

import os

import numpy as np
import pytest

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Small architectures that still exercise every code path: 3 levels (two up/down samplers), several ResNet layers,
# width changes (shortcut convs), the mid-block attention, and (asymmetric) a wider, deeper decoder.
KL_CONFIG = dict(
  block_out_channels=(32, 64, 64),
  down_block_types=('DownEncoderBlock2D',) * 3,
  up_block_types=('UpDecoderBlock2D',) * 3,
  layers_per_block=2,
  latent_channels=4,
  norm_num_groups=8,
  scaling_factor=0.18215,
)
# SD3/FLUX-style: no quant convs, 16 latent channels, shifted latents.
KL16_CONFIG = dict(
  block_out_channels=(32, 64),
  down_block_types=('DownEncoderBlock2D',) * 2,
  up_block_types=('UpDecoderBlock2D',) * 2,
  layers_per_block=1,
  latent_channels=16,
  norm_num_groups=8,
  scaling_factor=1.5305,
  shift_factor=0.0609,
  use_quant_conv=False,
  use_post_quant_conv=False,
)
ASYM_CONFIG = dict(
  down_block_out_channels=(32, 64, 64),
  down_block_types=('DownEncoderBlock2D',) * 3,
  up_block_out_channels=(48, 96, 96),
  up_block_types=('UpDecoderBlock2D',) * 3,
  layers_per_down_block=1,
  layers_per_up_block=2,
  latent_channels=4,
  norm_num_groups=16,
  scaling_factor=0.18215,
)


# The `tiny` preset's four-level f8 architecture (the same five feature taps, and down factors, as an SD decoder).
TINY_CONFIG = dict(
  block_out_channels=(32, 64, 128, 128),
  down_block_types=('DownEncoderBlock2D',) * 4,
  up_block_types=('UpDecoderBlock2D',) * 4,
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  scaling_factor=0.5,
)


def randomize_(module, seed: int) -> None:
  """Random values for every parameter, norms included (their default 1/0 would hide a scale/bias swap)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
      if p.ndim == 1 and 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))


def _make(kind: str, folder: str):
  import torch
  from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

  torch.manual_seed(0)
  if kind == 'asym':
    model = AsymmetricAutoencoderKL(**ASYM_CONFIG)
  else:
    model = AutoencoderKL(**{'kl': KL_CONFIG, 'kl16': KL16_CONFIG, 'tiny': TINY_CONFIG}[kind])
  randomize_(model, seed={'kl': 1, 'kl16': 2, 'asym': 3, 'tiny': 4}[kind])
  model.eval()
  model.save_pretrained(folder, safe_serialization=True)
  return model


@pytest.fixture(scope='session')
def diffusers_folder(tmp_path_factory):
  """`get(kind) -> (folder, torch_model)` for kind in {'kl', 'kl16', 'asym', 'tiny'}, built once per session."""
  cache = {}

  def get(kind):
    if kind not in cache:
      folder = str(tmp_path_factory.mktemp(f'diffusers_{kind}'))
      cache[kind] = (folder, _make(kind, folder))
    return cache[kind]

  return get


@pytest.fixture(scope='session')
def compilation_cache_dir(tmp_path_factory):
  """The session's persistent compilation cache: the trainer subprocesses (`tests.run.common.cli_env`), notebook
  kernels and in-process runs (`compilation_cache`) that share it compile each program once per session."""
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture
def compilation_cache(compilation_cache_dir):
  """This process compiles through the session's persistent cache while the test runs: what a trainer subprocess, or
  an earlier run in the test, compiled is loaded instead of compiled again. Then no cache, as before."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  settings = {
    'jax_compilation_cache_dir': str(compilation_cache_dir),
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': 0,
  }
  saved = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  cc.reset_cache()  # the cache is set up at the next compilation, with these settings
  try:
    yield compilation_cache_dir
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    cc.reset_cache()
