"""The paper's experiment in miniature on the embedded photographs, on a CPU, nothing downloaded (`make demo`,
`python -m lpl_jax.demo`):

  1. a small KL autoencoder trained on the photographs (cached after the first run),
  2. the photographs' latents encoded once into a latent cache,
  3. a small DiT pre-trained with DDPM-eps,
  4. two post-training branches from that checkpoint, the same steps and seeds, one with LPL and one without,
  5. samples from both (DDIM, EMA params),
  6. metrics for both against real crops: a Frechet distance on small-domain features (NOT Inception-FID),
     precision/recall (k=3), density/coverage (k=5), and the power-spectrum difference,
  7. `report.md` in the workdir with the table and the figures.

Every stage skips what an earlier run already finished (the autoencoder, the cache, checkpoints at their final
step), so a second `make demo` only recomputes the report. Whatever the numbers say is reported as measured: at
this scale they are noisy, see docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping

import numpy as np

from lpl_jax import data as data_lib
from lpl_jax import eval as eval_lib
from lpl_jax import lpl as lpl_lib
from lpl_jax.autoencoder import from_diffusers
from lpl_jax.eval import report, small_domain
from lpl_jax.train import build, loop
from lpl_jax.train.autoencoder import ensure_autoencoder, read_training_info
from lpl_jax.train.config import Experiment

RESOLUTION = 32


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """How big each stage is; `quick()` is the test suite's version."""

  ae_steps: int = 600
  ae_widths: tuple[int, ...] = (32, 64, 128)  # f4: 8x8x4 latents at 32 px
  cache_samples: int = 4096
  pretrain_steps: int = 4000
  post_steps: int = 600
  num_samples: int = 512
  extractor_steps: int = 300
  seed: int = 0

  @classmethod
  def quick(cls) -> DemoSettings:
    return cls(ae_steps=30, cache_samples=64, pretrain_steps=6, post_steps=4, num_samples=32, extractor_steps=10)


def _stage(name: str):
  print(f'\n== {name}', flush=True)
  return time.perf_counter()


def _done(t0: float) -> float:
  dt = time.perf_counter() - t0
  print(f'   ({dt:.0f} s)', flush=True)
  return dt


VARIANTS = ('pretrain', 'post', 'post,lpl')  # the experiments `run` needs, by configs/demo_cpu.py's variant


def run(workdir: str, experiments: Mapping[str, Experiment], s: DemoSettings = DemoSettings()) -> str:
  """Runs (or resumes) every stage and writes `<workdir>/report.md`; returns its path.

  Args:
    experiments: the pre-training and the two post-training experiments (`VARIANTS`: `configs/demo_cpu.py`'s);
      the stages set their autoencoder, data, steps and seed.
  """
  os.makedirs(workdir, exist_ok=True)
  times = {}

  t0 = _stage('1. autoencoder (trained on the embedded photographs once, then cached)')
  ae_folder, info = autoencoder_stage(os.path.join(workdir, 'autoencoder'), s)
  times['autoencoder'] = _done(t0)

  t0 = _stage('2. latents of the photographs into a latent cache')
  cache = cache_stage(os.path.join(workdir, 'latents'), ae_folder, s)
  times['cache'] = _done(t0)

  def config(variant, steps):
    return experiments[variant].replace(
      total_steps=steps,
      seed=s.seed,
      progress=True,
      data={'source': f'cache:{cache}'},
      autoencoder={'weights': ae_folder, 'allow_random_weights': False},
      lpl={'num_blocks': len(s.ae_widths)},
    )  # every decoder block (the paper's 4 blocks of an SD decoder)

  t0 = _stage(f'3. pre-training a DiT, DDPM-eps, {s.pretrain_steps} steps')
  pre = os.path.join(workdir, 'pretrain')
  loop.train_and_evaluate(config('pretrain', s.pretrain_steps), pre)
  times['pretrain'] = _done(t0)

  branches = {'baseline': 'post', 'LPL': 'post,lpl'}
  workdirs = {}
  for name, variant in branches.items():
    t0 = _stage(f'4. post-training, {name}: {s.post_steps} steps from the pre-training checkpoint')
    workdirs[name] = os.path.join(workdir, f'post_{name.lower()}')
    loop.train_and_evaluate(config(variant, s.post_steps).replace(init={'checkpoint': pre}), workdirs[name])
    times[f'post {name}'] = _done(t0)

  t0 = _stage(f'5. {s.num_samples} samples from each branch (DDIM, EMA)')
  samples = {}
  for name, variant in branches.items():
    samples[name], _, _ = build.samples_from_run(
      config(variant, s.post_steps), workdirs[name], num=s.num_samples, batch_size=64, seed=s.seed + 1
    )
  real = real_images(s.num_samples, s.seed + 2)
  times['sampling'] = _done(t0)

  t0 = _stage('6. metrics against real crops (small-domain features: NOT Inception-FID)')
  ext_params = extractor_stage(os.path.join(workdir, 'small_domain_extractor.npz'), s)
  metrics = {name: image_metrics(ext_params, real, images) for name, images in samples.items()}
  spectra = {name: eval_lib.radial_power_spectrum(x) for name, x in dict(real=real, **samples).items()}
  times['metrics'] = _done(t0)

  t0 = _stage('7. report')
  path = write_report(workdir, s, ae_folder, info, samples, real, metrics, spectra, workdirs, times)
  _done(t0)
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


def extractor_stage(path: str, s: DemoSettings):
  """The small-domain feature extractor's params, trained once and kept at `path`."""
  if os.path.isfile(path):
    return small_domain.load_params(path)
  params, _ = small_domain.train_small_domain_extractor(steps=s.extractor_steps, seed=s.seed, path=path)
  return params


def real_images(num: int, seed: int) -> np.ndarray:
  """Real crops the way training saw them: uint8 `[num, 32, 32, 3]`."""
  source = data_lib.make_source('embedded', num_samples=max(num, 64))
  pipeline = data_lib.make_image_pipeline(
    source, resolution=RESOLUTION, global_batch=num, seed=seed, random_crop=True, process_index=0, process_count=1
  )
  images = next(iter(pipeline))['images']
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def image_metrics(ext_params, real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
  feats = [
    eval_lib.extract_features(x, small_domain.small_domain_features, 64, params=ext_params, progress=False)
    for x in (real, fake)
  ]
  out = {
    'frechet_small_domain': eval_lib.frechet_distance(
      *eval_lib.feature_statistics(feats[0]), *eval_lib.feature_statistics(feats[1])
    )
  }
  pr = eval_lib.prdc(feats[0], feats[1], nearest_k=eval_lib.PR_NEAREST_K)
  dc = eval_lib.prdc(feats[0], feats[1], nearest_k=eval_lib.DC_NEAREST_K)
  out.update(precision=pr['precision'], recall=pr['recall'], density=dc['density'], coverage=dc['coverage'])
  return {k: float(v) for k, v in out.items()}


def write_report(workdir, s, ae_folder, ae_info, samples, real, metrics, spectra, workdirs, times) -> str:
  """`<workdir>/report.md` with its figures in `<workdir>/figures/`, and `<workdir>/metrics.json`."""
  write_figures(os.path.join(workdir, 'figures'), s, ae_folder, samples, real, spectra, workdirs)
  spec_err = {
    n: float(np.mean(np.abs(eval_lib.log_spectrum_difference(spectra[n], spectra['real']))))
    for n in ('baseline', 'LPL')
  }
  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(report_lines(s, ae_folder, ae_info, metrics, spec_err, times)) + '\n')
  with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
    json.dump({'metrics': metrics, 'spectrum_error': spec_err, 'seconds': times}, f, indent=2)
  return path


def write_figures(figs, s, ae_folder, samples, real, spectra, workdirs) -> None:
  """Sample grids side by side, loss curves, power-spectrum differences, and the decoder's feature maps of a real
  crop with the outlier masks LPL would apply to them."""
  os.makedirs(figs, exist_ok=True)
  report.side_by_side(
    {'real crops': real[:16], 'baseline (no LPL)': samples['baseline'][:16], 'with LPL': samples['LPL'][:16]},
    os.path.join(figs, 'samples.png'),
  )
  report.loss_curves_figure(
    {n: os.path.join(w, 'metrics.jsonl') for n, w in workdirs.items()}, os.path.join(figs, 'loss_curves.png')
  )
  eval_lib.plot_spectrum_difference(
    spectra['LPL'], spectra['baseline'], ('with LPL', 'baseline'), os.path.join(figs, 'spectrum_lpl_vs_baseline.png')
  )
  eval_lib.plot_spectrum_difference(
    spectra['LPL'], spectra['real'], ('with LPL', 'real'), os.path.join(figs, 'spectrum_lpl_vs_real.png')
  )
  eval_lib.plot_spectrum_difference(
    spectra['baseline'], spectra['real'], ('baseline', 'real'), os.path.join(figs, 'spectrum_baseline_vs_real.png')
  )
  model, params = from_diffusers(ae_folder)
  x = real[:1].astype(np.float32) / 127.5 - 1
  mean, _ = model.apply({'params': params}, x, method=model.encode)
  lcfg = lpl_lib.LPLConfig.from_preset('paper', num_blocks=len(s.ae_widths))
  taps = report.features_and_masks(model, params, model.scale_latents(mean), lcfg)
  report.feature_mask_figure(taps, os.path.join(figs, 'decoder_features_outliers.png'), image=x[0])


def report_lines(s, ae_folder, ae_info, metrics, spec_err, times) -> list[str]:
  """The markdown of the report: setup, the metrics of both branches, the figures, the time of each stage."""
  rows = [
    ('Frechet distance, small-domain features (lower is better; NOT Inception-FID)', 'frechet_small_domain', '{:.3f}'),
    ('precision (k=3)', 'precision', '{:.3f}'),
    ('recall (k=3)', 'recall', '{:.3f}'),
    ('density (k=5)', 'density', '{:.3f}'),
    ('coverage (k=5)', 'coverage', '{:.3f}'),
  ]
  lines = [
    '# LPL vs baseline in miniature',
    '',
    "The paper's experiment (Berrada et al., ICLR 2025, section 4) at toy scale on the photographs that ship with "
    'scikit-image, on a CPU. Numbers are as measured in this run; at this scale differences between the branches '
    'are within run-to-run noise unless they are large (docs/demo.md).',
    '',
    '## Setup',
    '',
    f'- autoencoder: KL, widths {list(s.ae_widths)}, trained {s.ae_steps} steps on {RESOLUTION} px crops; '
    f'held-out PSNR {ae_info.get("heldout_psnr", float("nan")):.2f} dB; `{ae_folder}`',
    f'- latent cache: {s.cache_samples} random crops (posterior mean and std)',
    f'- denoiser: DiT (width 128, depth 4, patch 2), DDPM-eps; pre-training {s.pretrain_steps} steps, then '
    f'{s.post_steps} post-training steps per branch from the same checkpoint with the same seeds',
    '- LPL branch: w_lpl 3, the paper preset, tau scaled to 32 px; EMA 0.995 with LPL, 0.998 without (the '
    "paper's ratio of half-lives)",
    f'- sampling: DDIM 25 steps, CFG 1.5, EMA params, {s.num_samples} samples per branch',
    '',
    '## Metrics',
    '',
    '| metric | baseline | with LPL |',
    '|---|---|---|',
  ]
  for label, key, fmt in rows:
    lines.append(f'| {label} | {fmt.format(metrics["baseline"][key])} | {fmt.format(metrics["LPL"][key])} |')
  lines.append(
    f'| mean abs log10 power-spectrum difference to real crops | {spec_err["baseline"]:.4f} | {spec_err["LPL"]:.4f} |'
  )
  lines += [
    '',
    '## Figures',
    '',
    '![samples](figures/samples.png)',
    '',
    'Loss curves of the two post-training branches:',
    '',
    '![loss curves](figures/loss_curves.png)',
    '',
    "Power spectra (the paper's Figures 4-5):",
    '',
    '![LPL vs baseline](figures/spectrum_lpl_vs_baseline.png)',
    '![LPL vs real](figures/spectrum_lpl_vs_real.png)',
    '![baseline vs real](figures/spectrum_baseline_vs_real.png)',
    '',
    "Decoder feature maps of a real crop and their outlier masks (Algorithm 1; the paper's Figure 13):",
    '',
    '![decoder features](figures/decoder_features_outliers.png)',
    '',
    '## Time',
    '',
    '| stage | seconds |',
    '|---|---|',
  ]
  lines += [f'| {k} | {v:.0f} |' for k, v in times.items()]
  return lines
