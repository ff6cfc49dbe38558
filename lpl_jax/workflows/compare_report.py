"""`report.md` of a paired comparison (`workflows.compare`): the paired differences first (the x0-hat fidelity curve,
then the sample-set metrics), one sentence per metric saying whether its difference is distinguishable from zero,
the values per seed, and the figures (curves with their bands over seeds, metric dots per seed joined by seed, sample
grids)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lpl_jax.eval import report

# The fidelity curve's metrics (`train.fidelity`): label, and whether lower is better (None: closer to 0 is).
CURVE_METRICS = {
  'psnr': ('PSNR of the decoded x0-hat vs the image (dB)', False),
  'psnr_recon': ('PSNR of the decoded x0-hat vs decode(z0) (dB)', False),
  'feature_distance': ('feature distance of the decoded x0-hat to the image', True),
  'hf_power_ratio': ('log10 high-frequency power, decoded x0-hat / image', None),
}
# Over the whole grid, one number per run: the mean over noise levels (of |value| for the power ratio).
GRID_MEAN = {
  'psnr': ('PSNR vs the image, mean over the noise grid (dB)', False),
  'psnr_recon': ('PSNR vs decode(z0), mean over the noise grid (dB)', False),
  'feature_distance': ('feature distance to the image, mean over the noise grid', True),
  'hf_power_ratio': ("|log10 high-frequency power ratio|, mean over the noise grid (0: the image's)", True),
}
SAMPLE_METRICS = {
  'fid': ('FID (Inception)', True),
  'fd_small_domain': ('Frechet distance, small-domain features (NOT Inception-FID)', True),
  'precision': ('precision (k = 3)', False),
  'recall': ('recall (k = 3)', False),
  'density': ('density (k = 5)', False),
  'coverage': ('coverage (k = 5)', False),
}


def _fmt(x: float, digits: int = 3) -> str:
  return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


def _interval(entry: Mapping[str, Any], digits: int = 3) -> str:
  i = entry['interval']
  return f'{_fmt(i["mean"], digits)} [{_fmt(i["low"], digits)}, {_fmt(i["high"], digits)}]'


def _p(d: Mapping[str, Any]) -> str:
  """`p = 0.023`, `p < 0.001` or `p n/a`."""
  p = d['p_value']
  return 'p n/a' if not np.isfinite(p) else ('p < 0.001' if p < 1e-3 else f'p = {p:.3f}')


def sentence(label: str, variant: str, base: str, d: Mapping[str, Any], lower_is_better: bool, level: float) -> str:
  """One sentence: the paired difference, its interval and p-value, distinguishable from zero or not."""
  i = d['interval']
  pct = f'{100 * level:.0f}%'
  head = (
    f'{label}: {variant} minus {base} = {_fmt(i["mean"])} ({pct} interval {_fmt(i["low"])} to {_fmt(i["high"])}, '
    f'paired t-test {_p(d)}, {i["n"]} seeds)'
  )
  if not d['distinguishable']:
    return f'{head}: not distinguishable from zero at {pct}.'
  better = (i['mean'] < 0) == lower_is_better
  return f'{head}: distinguishable from zero at {pct}, in favour of {variant if better else base}.'


def write(
  workdir: str,
  summary: Mapping[str, Any],
  samples: Mapping[str, np.ndarray],
  real: np.ndarray,
  *,
  title: str,
  preface: Sequence[str] = (),
  appendix: Sequence[str] = (),
) -> str:
  """Writes `<workdir>/report.md` and `<workdir>/figures/`; returns the report's path."""
  figs = os.path.join(workdir, 'figures')
  os.makedirs(figs, exist_ok=True)
  fidelity_figure(summary, os.path.join(figs, 'fidelity.png'))
  fidelity_figure(summary, os.path.join(figs, 'fidelity_difference.png'), difference=True)
  seeds_figure(summary, os.path.join(figs, 'metrics_per_seed.png'))
  report.side_by_side(
    {'real images': real[:16], **{name: x[:16] for name, x in samples.items()}}, os.path.join(figs, 'samples.png')
  )
  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join([f'# {title}', '', *preface, *lines(summary), *appendix]) + '\n')
  return path


def lines(summary: Mapping[str, Any]) -> list[str]:
  """The markdown of the comparison itself."""
  base, level, seeds = summary['baseline'], summary['level'], summary['seeds']
  variants = [n for n in summary['variants'] if n != base]
  pct = f'{100 * level:.0f}%'
  out = [
    f'## Paired differences to `{base}` ({len(seeds)} seeds, {pct} intervals)',
    '',
    f'Every variant was post-trained from the same starting point with seeds {seeds}; seed i drew the same batches, '
    'timesteps and noise in every variant, so each difference below is taken seed by seed (a paired t-test on the '
    'per-seed differences, Student t intervals).',
    '',
    '### x0-hat fidelity (what LPL acts on)',
    '',
    "On held-out real images, at each noise level of a fixed grid, the model's one-step estimate x0-hat is decoded "
    'and compared with the image and with the decoded clean latent decode(z0). One number per run: the mean over the '
    'grid.',
    '',
    '![paired differences of the fidelity curve](figures/fidelity_difference.png)',
    '',
  ]
  grid = summary['variants'][base].get('grid_mean', {})
  for name in variants:
    for key, (label, lower) in GRID_MEAN.items():
      if key in grid:
        d = summary['variants'][name]['grid_mean'][key]['difference']
        out.append(f'- {sentence(label, name, base, d, lower, level)}')
  out += ['', _curve_table(summary, variants), '', '### Sample-set metrics', '']
  metrics = list(summary['variants'][base]['metrics'])
  for name in variants:
    for key in metrics:
      label, lower = SAMPLE_METRICS.get(key, (key, True))
      d = summary['variants'][name]['metrics'][key]['difference']
      out.append(f'- {sentence(label, name, base, d, lower, level)}')
  out += ['', '| metric | ' + ' | '.join(summary['variants']) + ' | ' + ' | '.join(f'{n} - {base}' for n in variants)]
  out[-1] += ' |'
  out.append('|---' * (1 + len(summary['variants']) + len(variants)) + '|')
  for key in metrics:
    cells = [_interval(summary['variants'][n]['metrics'][key]) for n in summary['variants']]
    diffs = [summary['variants'][n]['metrics'][key]['difference'] for n in variants]
    cells += [f'{_interval(d)}, {_p(d)}' for d in diffs]
    out.append(f'| {SAMPLE_METRICS.get(key, (key,))[0]} | ' + ' | '.join(cells) + ' |')
  out += ['', f'Cells: mean [{pct} interval] over seeds.', '', '## Per seed', '']
  out += _per_seed_table(summary, metrics)
  out += [
    '',
    '## Figures',
    '',
    "The fidelity curve of each variant, mean and band over seeds (dashed: the autoencoder's reconstruction; "
    'dotted: the LPL threshold):',
    '',
    '![fidelity curves](figures/fidelity.png)',
    '',
    'Sample-set metrics, one dot per seed, the same seed joined across variants:',
    '',
    '![metrics per seed](figures/metrics_per_seed.png)',
    '',
    f"Samples of seed {seeds[0]} (EMA params, the evaluation's first conditions and noise):",
    '',
    '![samples](figures/samples.png)',
    '',
  ]
  return out


def _curve_table(summary: Mapping[str, Any], variants: Sequence[str]) -> str:
  """PSNR vs the image per noise level: each variant's mean and the paired difference with its interval."""
  base = summary['baseline']
  head = '| sigma/alpha | t | ' + ' | '.join(summary['variants']) + ' | '
  head += ' | '.join(f'{n} - {base}' for n in variants) + ' |'
  rows = [
    'PSNR of the decoded x0-hat vs the image (dB) per noise level, mean [interval] over seeds:',
    '',
    head,
    '|---' * (2 + len(summary['variants']) + len(variants)) + '|',
  ]
  for j, (s, t) in enumerate(zip(summary['noise_levels'], summary['timesteps'], strict=True)):
    cells = [_interval(summary['variants'][n]['fidelity']['psnr'][j], 2) for n in summary['variants']]
    cells += [_interval(summary['variants'][n]['fidelity']['psnr'][j]['difference'], 2) for n in variants]
    rows.append(f'| {s:.3g} | {t:.4g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def _per_seed_table(summary: Mapping[str, Any], metrics: Sequence[str]) -> list[str]:
  seeds = summary['seeds']
  grid = [k for k in GRID_MEAN if k in summary['variants'][summary['baseline']].get('grid_mean', {})]
  out = [
    '| variant | seed | '
    + ' | '.join(metrics)
    + ' | FD bootstrap std | '
    + ' | '.join(f'{k} (grid mean)' for k in grid)
    + ' |',
    '|---' * (3 + len(metrics) + len(grid)) + '|',
  ]
  for name, entry in summary['variants'].items():
    for i, seed in enumerate(seeds):
      cells = [_fmt(entry['metrics'][m]['values'][i]) for m in metrics]
      cells.append(_fmt(entry['frechet_bootstrap_std'][i]))
      cells += [_fmt(entry['grid_mean'][k]['values'][i]) for k in grid]
      out.append(f'| {name} | {seed} | ' + ' | '.join(cells) + ' |')
  out += [
    '',
    "FD bootstrap std: the standard deviation of the Frechet distance over resamples (with replacement) of the run's "
    'samples, its within-run uncertainty; compare it with the spread over seeds.',
  ]
  return out


def _axis(ax, summary: Mapping[str, Any]) -> None:
  ax.set_xscale('log')
  ax.set_xlabel('noise level sigma/alpha')
  if summary.get('lpl_threshold'):
    ax.axvline(summary['lpl_threshold'], color='gray', linestyle=':', linewidth=1)


def fidelity_figure(summary: Mapping[str, Any], path: str, *, difference: bool = False) -> str:
  """The fidelity curves, one panel per metric, each variant's mean with its band over seeds (dashed: the
  reconstruction's value); `difference`: each variant's paired difference to the baseline instead (line at 0)."""
  base = summary['baseline']
  keys = [k for k in CURVE_METRICS if k in summary['variants'][base]['fidelity']]
  x = np.asarray(summary['noise_levels'])
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys, strict=True):
    for name, entry in summary['variants'].items():
      if difference and name == base:
        continue
      bands = [e['difference']['interval'] if difference else e['interval'] for e in entry['fidelity'][key]]
      mean, low, high = (np.asarray([b[k] for b in bands]) for k in ('mean', 'low', 'high'))
      (line,) = ax.plot(x, mean, marker='o', markersize=3, label=f'{name} - {base}' if difference else name)
      ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    if difference:
      ax.axhline(0.0, color='black', linewidth=1)
    elif key in summary.get('ceiling', {}):
      ax.axhline(summary['ceiling'][key], color='black', linestyle='--', linewidth=1, label='decode(z0)')
    _axis(ax, summary)
    ax.set_title(CURVE_METRICS[key][0], fontsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def seeds_figure(summary: Mapping[str, Any], path: str) -> str:
  names = list(summary['variants'])
  keys = list(summary['variants'][names[0]]['metrics'])
  fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys, strict=True):
    values = np.asarray([summary['variants'][n]['metrics'][key]['values'] for n in names])  # [variants, seeds]
    pos = np.arange(len(names))
    ax.plot(pos, values, color='gray', linewidth=0.8, alpha=0.6)
    for i, n in enumerate(names):
      iv = summary['variants'][n]['metrics'][key]['interval']
      ax.scatter(np.full(values.shape[1], i), values[i], s=14, zorder=3)
      if np.isfinite(iv['low']):
        ax.errorbar(
          i + 0.15, iv['mean'], yerr=[[iv['mean'] - iv['low']], [iv['high'] - iv['mean']]], fmt='k_', capsize=3
        )
    ax.set_xticks(pos, names, fontsize=7)
    ax.set_title(textwrap.fill(SAMPLE_METRICS.get(key, (key,))[0], 32), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
