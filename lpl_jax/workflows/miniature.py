"""The paper's experiment in miniature on the embedded photographs, on a CPU, nothing downloaded (`make demo`,
`python -m lpl_jax.demo`):

  1. a small KL autoencoder trained on the photographs (cached after the first run),
  2. the photographs' latents encoded once into a latent cache,
  3. reference statistics of real crops on the features of a small classifier trained on the photographs (NOT
     Inception-FID),
  4. a small DiT pre-trained with DDPM-eps,
  5. a paired comparison (`workflows.compare`): N seeds of post-training from that checkpoint without and with LPL,
     each run evaluated (samples of the EMA params: Frechet distance with its bootstrap, precision/recall,
     density/coverage; the x0-hat fidelity curve on held-out crops), the paired differences with their intervals,
  6. `report.md` in the workdir: the paired differences first, then the values per seed, the figures, the decoder's
     feature maps and outlier masks, and the time of each stage.

Every stage skips what an earlier run already finished (the autoencoder, the cache, the reference, finished and
evaluated runs), so a second `make demo` only writes the report again, and a stopped one continues. Whatever the
numbers say is reported as measured, with its interval; docs/demo.md says what was found at this scale.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

import numpy as np

from lpl_jax import data as data_lib
from lpl_jax import lpl as lpl_lib
from lpl_jax.autoencoder import from_diffusers
from lpl_jax.eval import report, small_domain
from lpl_jax.train import loop, references
from lpl_jax.train.autoencoder import ensure_autoencoder, read_training_info
from lpl_jax.train.config import Experiment
from lpl_jax.workflows import compare

RESOLUTION = 32


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """How big each stage is; `quick()` is the test suite's version."""

  ae_steps: int = 600
  ae_widths: tuple[int, ...] = (32, 64, 128)  # f4: 8x8x4 latents at 32 px
  cache_samples: int = 4096
  pretrain_steps: int = 4000
  post_steps: int = 400  # configs/demo_cpu.py's post-training EMA half-lives are fractions of 400 steps
  seeds: int = 3
  num_samples: int = 1024  # per run, for the sample-set metrics (512 left the Frechet distance too noisy: docs/demo.md)
  reference_images: int = 4096
  fidelity_images: int = 128
  extractor_steps: int = 300
  seed: int = 0

  @classmethod
  def quick(cls) -> DemoSettings:
    return cls(
      ae_steps=30,
      cache_samples=64,
      pretrain_steps=6,
      post_steps=4,
      seeds=2,
      num_samples=32,
      reference_images=64,
      fidelity_images=8,
      extractor_steps=10,
    )


def _stage(name: str):
  print(f'\n== {name}', flush=True)
  return time.perf_counter()


def _done(t0: float) -> float:
  dt = time.perf_counter() - t0
  print(f'   ({dt:.0f} s)', flush=True)
  return dt


VARIANTS = ('pretrain', 'post', 'post,lpl')  # the experiments `run` needs, by configs/demo_cpu.py's variant
BRANCHES = {'baseline': 'post', 'lpl': 'post,lpl'}  # the comparison's variants: its baseline first


def run(workdir: str, experiments: Mapping[str, Experiment], s: DemoSettings = DemoSettings()) -> str:
  """Runs (or resumes) every stage and writes `<workdir>/report.md`; returns its path.

  Args:
    experiments: the pre-training and the two post-training experiments (`VARIANTS`: `configs/demo_cpu.py`'s);
      the stages set their autoencoder, data, steps, evaluation and seed.
  """
  os.makedirs(workdir, exist_ok=True)
  times = {}

  t0 = _stage('1. autoencoder (trained on the embedded photographs once, then cached)')
  ae_folder, info = autoencoder_stage(os.path.join(workdir, 'autoencoder'), s)
  times['autoencoder'] = _done(t0)

  t0 = _stage('2. latents of the photographs into a latent cache')
  cache = cache_stage(os.path.join(workdir, 'latents'), ae_folder, s)
  times['cache'] = _done(t0)

  t0 = _stage('3. reference statistics of real crops (small-domain features: NOT Inception-FID)')
  reference = reference_stage(workdir, s)
  times['reference'] = _done(t0)

  def config(variant, steps):
    return experiments[variant].replace(
      total_steps=steps,
      seed=s.seed,
      progress=True,
      data={'source': f'cache:{cache}'},
      autoencoder={'weights': ae_folder, 'allow_random_weights': False},
      lpl={'num_blocks': len(s.ae_widths)},  # every decoder block (the paper's 4 blocks of an SD decoder)
      eval={'reference': reference, 'features': 'small_domain', 'num_images': s.num_samples, 'batch_size': 64},
    )

  t0 = _stage(f'4. pre-training a DiT, DDPM-eps, {s.pretrain_steps} steps')
  pre = os.path.join(workdir, 'pretrain')
  loop.train_and_evaluate(config('pretrain', s.pretrain_steps), pre)
  times['pretrain'] = _done(t0)

  t0 = _stage(f'5. paired comparison: {s.seeds} seeds x {list(BRANCHES)}, {s.post_steps} post-training steps each')
  branches = {
    name: config(variant, s.post_steps).replace(init={'checkpoint': pre}) for name, variant in BRANCHES.items()
  }
  settings = compare.CompareSettings(
    seeds=s.seeds, first_seed=s.seed, fidelity_source='embedded', fidelity_images=s.fidelity_images
  )
  path = compare.run(
    workdir,
    branches,
    settings,
    title='LPL vs baseline in miniature',
    preface=preface_lines(s),
  )
  if path is None:
    raise RuntimeError('a post-training run was stopped (SIGTERM): run the demo again to continue.')
  times['comparison'] = _done(t0)

  t0 = _stage('6. figures of the decoder and the runs of the first seed')
  appendix = setup_lines(s, ae_folder, info, branches) + write_figures(workdir, s, ae_folder)
  times['figures'] = _done(t0)
  with open(path, 'a') as f:
    f.write('\n'.join(appendix + ['', '## Time', '', '| stage | seconds |', '|---|---|']))
    f.write('\n' + '\n'.join(f'| {k} | {v:.0f} |' for k, v in times.items()) + '\n')
  print(f'\nreport: {path}')
  return path


def autoencoder_stage(cache_dir: str, s: DemoSettings) -> tuple[str, dict]:
  """`(diffusers folder, its training info)` of the demo's autoencoder, trained on first use."""
  folder = ensure_autoencoder(cache_dir, resolution=RESOLUTION, widths=s.ae_widths, steps=s.ae_steps, seed=s.seed)
  info = read_training_info(folder) or {}
  print(f'   {folder}: held-out PSNR {info.get("heldout_psnr", float("nan")):.2f} dB')
  return folder, info


def cache_stage(cache: str, ae_folder: str, s: DemoSettings) -> str:
  """The latent cache of `s.cache_samples` random crops (posterior mean and std), written once."""
  if not os.path.isfile(os.path.join(cache, 'index.json')):
    model, params = from_diffusers(ae_folder)
    source = data_lib.make_source('embedded', num_samples=s.cache_samples)
    data_lib.encode_to_cache(
      source,
      model,
      params,
      cache,
      resolution=RESOLUTION,
      batch_size=64,
      store_std=True,
      random_crop=True,
      seed=s.seed,
      overwrite=True,
    )
  return cache


def reference_stage(workdir: str, s: DemoSettings) -> str:
  """The reference file of real crops (`lpl_jax.evaluate --write_reference`'s), with the small-domain extractor
  trained once on the photographs; written once."""
  path = os.path.join(workdir, 'reference_small_domain.npz')
  if not os.path.isfile(path):
    ext = os.path.join(workdir, 'small_domain_extractor.npz')
    if os.path.isfile(ext):
      params = small_domain.load_params(ext)
    else:
      params, _ = small_domain.train_small_domain_extractor(steps=s.extractor_steps, seed=s.seed, path=ext)
    references.write_reference(
      path,
      source='embedded',
      resolution=RESOLUTION,
      features='small_domain',
      num_images=s.reference_images,
      small_domain_params=params,
      seed=s.seed + 2,
      progress=False,
    )
  return path


def write_figures(workdir: str, s: DemoSettings, ae_folder: str) -> list[str]:
  """Loss curves of the first seed's runs and the decoder's feature maps of a real crop with the outlier masks LPL
  would apply to them; returns the report's lines for them."""
  figs = os.path.join(workdir, 'figures')
  os.makedirs(figs, exist_ok=True)
  report.loss_curves_figure(
    {n: os.path.join(compare.run_dir(workdir, n, s.seed), 'metrics.jsonl') for n in BRANCHES},
    os.path.join(figs, 'loss_curves.png'),
  )
  model, params = from_diffusers(ae_folder)
  crops, _ = references.read_images('embedded', resolution=RESOLUTION, num_images=1, seed=s.seed + 3)
  x = next(crops).astype(np.float32) / 127.5 - 1
  mean, _ = model.apply({'params': params}, x, method=model.encode)
  lcfg = lpl_lib.LPLConfig.from_preset('paper', num_blocks=len(s.ae_widths))
  taps = report.features_and_masks(model, params, model.scale_latents(mean), lcfg)
  report.feature_mask_figure(taps, os.path.join(figs, 'decoder_features_outliers.png'), image=x[0])
  return [
    "## The demo's decoder and training curves",
    '',
    f'Loss curves of the seed-{s.seed} runs:',
    '',
    '![loss curves](figures/loss_curves.png)',
    '',
    "Decoder feature maps of a real crop and their outlier masks (Algorithm 1; the paper's Figure 13):",
    '',
    '![decoder features](figures/decoder_features_outliers.png)',
    '',
  ]


def preface_lines(s: DemoSettings) -> list[str]:
  """The report's opening sentence; the paired differences follow it."""
  return [
    "The paper's experiment (Berrada et al., ICLR 2025, section 4) at toy scale on the photographs that ship with "
    f'scikit-image, on a CPU: {s.seeds} post-training runs per branch, paired by seed; the setup is at the end. '
    'docs/demo.md says what this scale can and cannot show.',
    '',
  ]


def setup_lines(s: DemoSettings, ae_folder: str, ae_info: Mapping, branches: Mapping[str, Experiment]) -> list[str]:
  """What ran (the settings as the runs used them)."""
  base, lpl = branches['baseline'], branches['lpl']
  return [
    '## Setup',
    '',
    f'- autoencoder: KL, widths {list(s.ae_widths)}, trained {s.ae_steps} steps on {RESOLUTION} px crops; '
    f'held-out PSNR {ae_info.get("heldout_psnr", float("nan")):.2f} dB; `{ae_folder}`',
    f'- latent cache: {s.cache_samples} random crops (posterior mean and std)',
    f'- denoiser: DiT (width {base.model.hidden_size}, depth {base.model.depth}, patch {base.model.patch_size}), '
    f'DDPM-eps; pre-training {s.pretrain_steps} steps, then {s.post_steps} post-training steps per run from that '
    'checkpoint',
    f'- LPL branch: the {lpl.lpl.preset} preset, weight {lpl.lpl.weight if lpl.lpl.weight >= 0 else "of the preset"}, '
    f'tau scaled to {RESOLUTION} px; both branches draw the same stratified timesteps',
    f'- EMA decay {base.optim.ema_decay} (baseline) and {lpl.optim.ema_decay} (LPL), from the pre-training EMA, no '
    'warmup',
    f'- evaluation: {s.num_samples} samples per run (DDIM {base.sample.steps} steps, CFG {base.sample.guidance}, EMA '
    f'params) against {s.reference_images} real crops, on the features of a small classifier trained on the '
    'photographs (NOT Inception-FID); the fidelity curve on '
    f'{s.fidelity_images} held-out crops',
    '',
  ]
