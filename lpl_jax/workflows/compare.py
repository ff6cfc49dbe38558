"""A paired, multi-seed comparison of post-training variants (`python -m lpl_jax.compare`; `make demo` runs one).

From one starting point (the variants' common `init.checkpoint`: a pre-training run of ours or imported weights),
every variant is post-trained with the same N seeds. Seed i of every variant draws the same batches, timesteps and
noise: the runs share `seed`, the data and the starting point, and `step.stratify_timesteps` makes a run without LPL
draw its timesteps the way an LPL run of the same config does. Then every run is evaluated the same way:

- the training loop's evaluation (`train.evaluation.Evaluator`: the run's sampler on its EMA params, the extractor
  of the reference file `eval.reference`): the Frechet distance, precision, recall, density and coverage, and a
  bootstrap over the samples of the Frechet distance (its within-run uncertainty, `eval.stats.bootstrap_frechet`);
- the x0-hat fidelity curve (`train.fidelity`): on held-out real images at a fixed grid of noise levels, the decoded
  one-step estimate against the image and against the autoencoder's reconstruction.

Per variant the report gives the mean and a 95% interval over seeds of every metric, and the paired difference to
the first variant (the baseline) with its interval and the p-value of a paired t-test (`eval.stats`).

`DIR` holds `runs/<variant>/seed_<i>/` (a training workdir each, and `result.json` once it is evaluated),
`results.json`, `report.md` and `figures/`. Running the same command again continues a stopped comparison: a
finished run is not trained again and an evaluated one not evaluated again; a run stopped midway resumes from its
checkpoint like any training run.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lpl_jax import data as data_lib
from lpl_jax import lpl as lpl_lib
from lpl_jax.eval import reference as ref_lib
from lpl_jax.eval import stats
from lpl_jax.train import build, evaluation, fidelity, loop
from lpl_jax.train.config import Experiment, load_run
from lpl_jax.train.errors import ConfigError
from lpl_jax.workflows import compare_report

log = logging.getLogger(__name__)

RESULT_FILE = 'result.json'
RESULTS_FILE = 'results.json'
SAMPLES_FILE = 'samples.npz'
# Variants that need no definition: the config as given, and the config file's `lpl` variant (configs/common.py's
# grammar: the paper's LPL post-training recipe of that config, its EMA decay included).
PREDEFINED = {'baseline': '', 'lpl': 'lpl'}
_NAME = re.compile(r'^[A-Za-z0-9_\-]+$')
# Fields that do not change what a run trains (how it logs, saves, samples grids and evaluates inside the loop): a run
# launched by hand with other values of these is still the variant's run.
NOT_TRAINING = (
  'progress',
  'log_every',
  'checkpoint_every',
  'keep_checkpoints',
  'num_sample_images',
  'sample_every',
  'eval.every',
  'eval.keep_best',
  'profile.',
  'guard.',
)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named change of the config: variant tokens of the config file (`lpl`, `v`, ...: appended to the config's
  argument, `file.py:post` -> `file.py:post,lpl`) and field overrides (`lpl.tau=2`), applied in that order."""

  name: str
  tokens: tuple[str, ...] = ()
  overrides: tuple[tuple[str, str], ...] = ()

  def spec(self) -> str:
    return '+'.join(list(self.tokens) + [f'{k}={v}' for k, v in self.overrides]) or '(the config as given)'


def parse_variants(text: str) -> list[Variant]:
  """`--variants`: comma-separated `NAME` (predefined: `baseline`, `lpl`) or `NAME=PART[+PART...]`, each part a field
  override `section.field=value` or a variant token of the config file. The first variant is the baseline the
  others are compared with.

  Example: `baseline,lpl,lpl_tau2=lpl+lpl.tau=2,lpl_depth2=lpl+lpl.num_blocks=2`.
  """
  variants = []
  for item in (s.strip() for s in text.split(',')):
    if not item:
      continue
    name, _, spec = item.partition('=')
    if not _NAME.match(name):
      raise ConfigError(f'--variants: {item!r}: a variant name is letters, digits, _ and -.')
    if not spec:
      if name not in PREDEFINED:
        raise ConfigError(
          f'--variants: unknown variant {name!r}; predefined are {sorted(PREDEFINED)}, others are defined as '
          f'{name}=section.field=value[+...] or {name}=TOKEN (a variant of the config file, e.g. lpl).'
        )
      spec = PREDEFINED[name]
    tokens, overrides = [], []
    for part in filter(None, spec.split('+')):
      if '=' in part:
        key, _, value = part.partition('=')
        overrides.append((key.strip(), value.strip()))
      else:
        tokens.append(part.strip())
    variants.append(Variant(name, tuple(tokens), tuple(overrides)))
  names = [v.name for v in variants]
  if len(variants) < 2 or len(set(names)) != len(names):
    raise ConfigError(
      f'--variants={text!r}: give at least two variants with distinct names (the first is the baseline).'
    )
  return variants


def _coerce(current: Any, text: str, key: str) -> Any:
  """`text` as the type of the field's current value."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError('expected true or false')
      return text.lower() in ('true', '1')
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      return type(current)(ast.literal_eval(text))
    return text
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f'--variants: {key}={text!r}: not a {type(current).__name__} ({e}).') from e


def apply_overrides(config: Any, variant: Variant) -> Any:
  """The ConfigDict `config` with `variant`'s field overrides set (unknown fields are errors naming the variant)."""
  config = config.copy_and_resolve_references()
  for key, text in variant.overrides:
    *sections, field = key.split('.')
    node = config
    for section in sections:
      if section not in node:
        raise ConfigError(f'--variants: {variant.name}: the config has no section {section!r} (in {key}).')
      node = node[section]
    if field not in node:
      raise ConfigError(f'--variants: {variant.name}: the config has no field {key!r}.')
    node[field] = _coerce(node[field], text, key)
  return config


@dataclasses.dataclass(frozen=True)
class CompareSettings:
  """How many seeds and how each run is measured.

  Attributes:
    seeds, first_seed: the runs use seeds `first_seed, ..., first_seed + seeds - 1`.
    fidelity_source, fidelity_split: the held-out real images of the fidelity curve (a data source holding images;
      '' = `data.source` and `data.split`). The images are cropped as the training pipeline crops them, from
      `fidelity_seed`.
    fidelity_images: how many.
    noise_levels: the curve's grid of sigma/alpha.
    bootstrap: resamples of the Frechet distance's bootstrap.
    level: of every interval.
    grid_images: samples per run kept for the report's grids.
  """

  seeds: int = 3
  first_seed: int = 0
  fidelity_source: str = ''
  fidelity_split: str = ''
  fidelity_images: int = 64
  fidelity_seed: int = 1_000_003
  noise_levels: tuple[float, ...] = fidelity.DEFAULT_NOISE_LEVELS
  bootstrap: int = 200
  level: float = 0.95
  grid_images: int = 16

  def __post_init__(self):
    if self.seeds < 2:
      raise ConfigError(f'--seeds={self.seeds}: a paired comparison needs at least 2 seeds (3 or more to be useful).')
    if self.fidelity_images < 2 or self.bootstrap < 10 or not 0 < self.level < 1:
      raise ConfigError(
        f'fidelity_images={self.fidelity_images} (>= 2), bootstrap={self.bootstrap} (>= 10), level={self.level} '
        '(in (0, 1)).'
      )


def run_experiment(exp: Experiment, seed: int) -> Experiment:
  """The experiment of one run: its seed, the timesteps stratified as with LPL, no evaluation inside the loop (the
  comparison evaluates each run once, at its end)."""
  return exp.replace(seed=seed, step={'stratify_timesteps': True}, eval={'every': 0})


def check_experiments(experiments: Mapping[str, Experiment]) -> None:
  """The variants must start from one point, read the same data and name a reference to evaluate against."""
  first_name, first = next(iter(experiments.items()))
  if not first.init.checkpoint:
    raise ConfigError(
      'init.checkpoint is empty: a comparison post-trains every variant from one starting point (a pre-training '
      'workdir, a diffusers folder or a DiT .pt file).'
    )
  for name, exp in experiments.items():
    for section in ('init', 'data'):
      if getattr(exp, section) != getattr(first, section):
        raise ConfigError(
          f'variants {first_name!r} and {name!r} differ in their {section} section: paired runs need the same '
          f'starting point and data ({getattr(first, section)} vs {getattr(exp, section)}).'
        )
    if not exp.eval.reference:
      raise ConfigError(
        f'variant {name!r}: eval.reference is empty; write the reference statistics once with python -m '
        'lpl_jax.evaluate --write_reference and name them (docs/eval.md).'
      )


def held_out_images(exp: Experiment, settings: CompareSettings) -> dict[str, np.ndarray]:
  """`{'images': uint8 [N, R, R, 3], 'labels': [N]?}`: the fidelity curve's real images."""
  source = settings.fidelity_source or exp.data.source
  if source.startswith('cache:'):
    raise ConfigError(
      f'data.source={source!r} is a latent cache, which holds no images: name the images it was encoded from with '
      '--fidelity_source (the fidelity curve compares decoded estimates with real images).'
    )
  n = settings.fidelity_images
  embedded = source == 'embedded'
  src = data_lib.make_source(
    source,
    split=settings.fidelity_split or exp.data.split,
    data_dir=exp.data.data_dir or None,
    num_samples=max(n, 64) if embedded else None,
  )
  pipeline = data_lib.make_image_pipeline(
    src,
    resolution=exp.data.resolution,
    global_batch=n,
    seed=settings.fidelity_seed,
    random_crop=exp.data.random_crop,
    process_index=0,
    process_count=1,
  )
  batch = next(iter(pipeline))
  out = {'images': np.round((np.clip(batch['images'], -1, 1) + 1) * 127.5).astype(np.uint8)}
  if 'labels' in batch:
    out['labels'] = np.asarray(batch['labels'], np.int32)
  return out


def _conditions(exp: Experiment, real: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The fidelity curve's conditions: the images' classes, or a text model's null condition (zero embeddings)."""
  n = real['images'].shape[0]
  if exp.model.text:
    spec = build.batch_spec(exp)
    return {k: np.zeros((n,) + spec[k].shape[1:], np.float32) for k in ('context', 'pooled') if k in spec}
  labels = real.get('labels')
  if labels is None:
    labels = np.full((n,), exp.model.num_classes, np.int32)  # the null class
  return {'y': labels}


def _finished(workdir: str, total_steps: int) -> bool:
  path = os.path.join(workdir, loop.STATUS_FILE)
  if not os.path.isfile(path):
    return False
  status = json.load(open(path))
  return status.get('state') == 'finished' and status.get('step') == total_steps


def evaluate_run(
  exp: Experiment,
  workdir: str,
  real: Mapping[str, np.ndarray],
  settings: CompareSettings,
  *,
  train_seconds: float = 0.0,
) -> dict[str, Any]:
  """Evaluates the finished run in `workdir`: sample metrics with the Frechet distance's bootstrap, and the x0-hat
  fidelity curve, both of its EMA params. Writes `result.json` and `samples.npz` there and returns the result."""
  t0 = time.perf_counter()
  run = loop.setup(exp, compile_step=False)
  state, step = build.restore_state(exp, build.checkpoint_folder(workdir), run.model, run.mesh)
  evaluator = evaluation.Evaluator(run)
  images, features = evaluator.samples_and_features(state.ema_params)
  reference = evaluator.reference
  metrics = ref_lib.compare(reference, features)
  boot = stats.bootstrap_frechet(
    features, reference.mu, reference.sigma, num_resamples=settings.bootstrap, level=settings.level, seed=exp.seed
  )
  extractor = ref_lib.reference_extractor(reference, inception_weights=exp.eval.inception_weights or None)
  probe = fidelity.FidelityProbe(
    model=run.model,
    form=run.step_cfg.formulation,
    ae_model=run.ae_model,
    ae_params=run.ae_params,
    images=real['images'],
    conditions=_conditions(exp, real),
    noise_levels=settings.noise_levels,
    seed=settings.fidelity_seed,
    extractor=extractor,
  )
  curve = probe.curve(state.ema_params)
  result = {
    'seed': exp.seed,
    'step': int(step),
    'metrics': {k: float(v) for k, v in metrics.items()},
    'distance_name': reference.distance_name,
    'frechet_bootstrap': {k: float(v) for k, v in boot.items()},
    'fidelity': curve.to_json(),
    'lpl_threshold': _lpl_threshold(run),
    'seconds': time.perf_counter() - t0,
    'train_seconds': train_seconds,  # of this call's training (0: trained before)
  }
  np.savez(os.path.join(workdir, SAMPLES_FILE), images=images[: settings.grid_images])
  tmp = os.path.join(workdir, f'.{RESULT_FILE}.tmp')
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, os.path.join(workdir, RESULT_FILE))
  return result


def _lpl_threshold(run: Any) -> float | None:
  """The noise level below which LPL applies in this run (None without LPL), for the figures."""
  cfg = run.step_cfg
  if cfg.lpl is None:
    return None
  return float(lpl_lib.noise_level_threshold(cfg.lpl, run.exp.data.resolution, cfg.formulation))


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, Mapping) else {f'{prefix}{k}': v})
  return out


def check_same_run(workdir: str, name: str, exp: Experiment) -> None:
  """A run already in `workdir` must be the one `exp` describes: reusing it under a changed variant definition would
  report the old runs as the new variant."""
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return
  old, new = _flat(load_run(workdir).to_dict()), _flat(exp.to_dict())
  changed = sorted(k for k in set(old) | set(new) if not k.startswith(NOT_TRAINING) and old.get(k) != new.get(k))
  if changed:
    shown = ', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in changed[:6])
    raise ConfigError(
      f'{workdir} was trained as variant {name!r} with another config ({shown}); give the changed variant another '
      'name or the comparison another workdir.'
    )


def run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', name, f'seed_{seed}')


def run(
  workdir: str,
  experiments: Mapping[str, Experiment],
  settings: CompareSettings = CompareSettings(),
  *,
  title: str = 'Paired comparison',
  preface: Sequence[str] = (),
  appendix: Sequence[str] = (),
  on_run: Callable[[str, int], None] | None = None,
) -> str | None:
  """Trains and evaluates every (variant, seed), seed by seed, and writes `<workdir>/report.md`; returns its path,
  or None when a run was preempted (SIGTERM) after saving a checkpoint: the same call continues the comparison.

  Args:
    experiments: the variants' experiments by name, the baseline first (`parse_variants`, `experiment_of`).
    preface, appendix: markdown lines put before the comparison's tables and after its figures (the demo's setup).
    on_run: called with `(variant, seed)` after each run is evaluated (tests stop a comparison midway with it).
  """
  check_experiments(experiments)
  names = list(experiments)
  os.makedirs(workdir, exist_ok=True)
  real = held_out_images(next(iter(experiments.values())), settings)
  results: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
  seeds = range(settings.first_seed, settings.first_seed + settings.seeds)
  for seed in seeds:
    for name in names:
      exp = run_experiment(experiments[name], seed)
      wd = run_dir(workdir, name, seed)
      check_same_run(wd, name, exp)
      path = os.path.join(wd, RESULT_FILE)
      if os.path.isfile(path) and _finished(wd, exp.total_steps):
        results[name][seed] = json.load(open(path))
        print(f'   {name}, seed {seed}: done earlier', flush=True)
        continue
      print(f'   {name}, seed {seed}: post-training {exp.total_steps} steps into {wd}', flush=True)
      t0 = time.perf_counter()
      if not _finished(wd, exp.total_steps):
        outcome = loop.train_and_evaluate(exp, wd)
        if not outcome.finished:  # preempted (SIGTERM) after a checkpoint
          print(f'   {wd} stopped at step {outcome.step}: run the comparison again to continue.', flush=True)
          return None
      results[name][seed] = evaluate_run(exp, wd, real, settings, train_seconds=time.perf_counter() - t0)
      m = results[name][seed]['metrics']
      print(f'   {name}, seed {seed}: ' + ', '.join(f'{k} {v:.4g}' for k, v in m.items()), flush=True)
      if on_run is not None:
        on_run(name, seed)
  summary = summarize(results, names, settings.level)
  with open(os.path.join(workdir, RESULTS_FILE), 'w') as f:
    json.dump({'variants': {n: experiments[n].to_dict() for n in names}, 'summary': summary, 'runs': results}, f)
  samples = {n: np.load(os.path.join(run_dir(workdir, n, seeds[0]), SAMPLES_FILE))['images'] for n in names}
  return compare_report.write(
    workdir, summary, samples, real['images'], title=title, preface=preface, appendix=appendix
  )


def summarize(results: Mapping[str, Mapping[int, Mapping[str, Any]]], names: Sequence[str], level: float) -> dict:
  """Per variant and metric: the values per seed, their interval, and the paired difference to `names[0]`; the
  same per noise level for the fidelity curve."""
  base = names[0]
  seeds = sorted(set.intersection(*(set(results[n]) for n in names)))
  first = results[base][seeds[0]]
  metric_names = list(first['metrics'])
  curve_names = list(first['fidelity']['metrics'])
  out = {
    'baseline': base,
    'seeds': seeds,
    'level': level,
    'distance_name': first['distance_name'],
    'noise_levels': first['fidelity']['noise_levels'],
    'timesteps': first['fidelity']['timesteps'],
    'ceiling': first['fidelity']['ceiling'],
    'lpl_threshold': next(
      (results[n][seeds[0]]['lpl_threshold'] for n in names if results[n][seeds[0]]['lpl_threshold']), None
    ),
    'variants': {},
  }
  for name in names:
    rows = [results[name][s] for s in seeds]
    base_rows = [results[base][s] for s in seeds]
    entry = {'metrics': {}, 'fidelity': {}, 'frechet_bootstrap_std': [r['frechet_bootstrap']['std'] for r in rows]}
    for m in metric_names:
      values = [r['metrics'][m] for r in rows]
      entry['metrics'][m] = _summary(values, [r['metrics'][m] for r in base_rows], name != base, level)
    for m in curve_names:
      per_level = np.asarray([r['fidelity']['metrics'][m] for r in rows])  # [seeds, L]
      base_level = np.asarray([r['fidelity']['metrics'][m] for r in base_rows])
      entry['fidelity'][m] = [
        _summary(per_level[:, j].tolist(), base_level[:, j].tolist(), name != base, level)
        for j in range(per_level.shape[1])
      ]
    entry['grid_mean'] = {
      m: _summary(_grid_mean(rows, m), _grid_mean(base_rows, m), name != base, level) for m in curve_names
    }
    out['variants'][name] = entry
  return out


def _grid_mean(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
  """Per run, the fidelity curve's mean over the noise grid (of |value| for the power ratio, whose ideal is 0)."""
  curves = np.asarray([r['fidelity']['metrics'][metric] for r in rows], np.float64)
  return (np.abs(curves) if metric == 'hf_power_ratio' else curves).mean(axis=1).tolist()


def _summary(values: list[float], base: list[float], paired: bool, level: float) -> dict[str, Any]:
  out = {'values': values, 'interval': stats.mean_interval(values, level).to_dict()}
  if paired:
    out['difference'] = stats.paired_difference(values, base, level).to_dict()
  return out


def experiment_of(load_config: Callable[[tuple[str, ...]], Any], variant: Variant) -> Experiment:
  """The experiment of `variant`: the config loaded with its tokens (`load_config(tokens)`, `config_loader`), then
  the variant's overrides."""
  return Experiment.from_config_dict(apply_overrides(load_config(variant.tokens), variant))


def device_summary() -> str:
  return f'{jax.device_count()} {jax.devices()[0].platform} device(s)'


def config_loader(spec: str, overrides: Mapping[str, Any] | None = None) -> Callable[[tuple[str, ...]], Any]:
  """`load(tokens)`: the ConfigDict of the config file `spec` (`path.py[:arg]`) with the variant tokens appended to
  its argument (`path.py:post` + ('lpl',) -> `get_config('post,lpl')`), then `overrides` (dotted names: the command
  line's `--config.a.b=v`) set."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config={spec!r}: no such config file {path!r}.')
  module_spec = importlib.util.spec_from_file_location(f'_lpl_jax_compare_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)

  def load(tokens: tuple[str, ...]) -> Any:
    full = ','.join([a for a in [arg] if a] + list(tokens))
    try:
      config = module.get_config(full) if full else module.get_config()
    except (ValueError, KeyError) as e:
      raise ConfigError(f'--config={path}:{full}: {e}') from e
    if overrides:
      config.update_from_flattened_dict(dict(overrides))
    return config

  return load
