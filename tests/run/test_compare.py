"""`python -m lpl_jax.compare`: variants as named overrides, pairing (seed i of every variant draws the same batches,
timesteps and noise), and a comparison stopped midway that the same command finishes, with its statistics checked
against SciPy on the per-seed values the runs wrote."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from lpl_jax.eval import reference as ref_lib
from lpl_jax.eval import small_domain
from lpl_jax.train import loop, references
from lpl_jax.train.config import step_config
from lpl_jax.train.errors import ConfigError
from lpl_jax.train.step import noise_batch
from lpl_jax.workflows import compare
from tests.run import common


def _experiments(text, **overrides):
  load = compare.config_loader(f'{common.DEMO}:post', overrides)
  return {v.name: compare.experiment_of(load, v) for v in compare.parse_variants(text)}


def test_variants_are_named_overrides_and_config_tokens():
  variants = compare.parse_variants('baseline,lpl,lpl_tau2=lpl+lpl.tau=2+optim.ema_decay=0.99,fast=optim.lr=1e-3')
  assert [v.name for v in variants] == ['baseline', 'lpl', 'lpl_tau2', 'fast']
  assert variants[0].tokens == () and variants[1].tokens == ('lpl',)
  assert variants[2].tokens == ('lpl',) and variants[2].overrides == (('lpl.tau', '2'), ('optim.ema_decay', '0.99'))
  exps = _experiments('baseline,lpl,lpl_tau2=lpl+lpl.tau=2+optim.ema_decay=0.99,fast=optim.lr=1e-3')
  assert not exps['baseline'].lpl.enabled and exps['lpl'].lpl.enabled
  # `lpl` is the config file's own LPL recipe (its EMA decay included); overrides come after it, typed as the field.
  assert exps['lpl'].optim.ema_decay == 0.94 and exps['baseline'].optim.ema_decay == 0.975
  assert exps['lpl_tau2'].lpl.tau == 2.0 and isinstance(exps['lpl_tau2'].lpl.tau, float)
  assert exps['lpl_tau2'].optim.ema_decay == 0.99 and exps['fast'].optim.lr == 1e-3 and not exps['fast'].lpl.enabled


@pytest.mark.parametrize(
  'text, message',
  [
    ('baseline', 'at least two variants'),
    ('baseline,baseline', 'distinct names'),
    ('baseline,sharp', "unknown variant 'sharp'"),
    ('baseline,x=lpl.nope=1', "no field 'lpl.nope'"),
    ('baseline,x=nope.tau=1', "no section 'nope'"),
    ('baseline,x=lpl.enabled=maybe', "lpl.enabled='maybe': not a bool"),
    ('baseline,x=lpl.tau=abc', "lpl.tau='abc': not a float"),
    ('baseline,a b=lpl', 'a variant name is'),
  ],
)
def test_bad_variants_are_one_error_naming_them(text, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    _experiments(text)


def test_variants_must_share_start_data_and_a_reference():
  with pytest.raises(ConfigError, match='init.checkpoint is empty'):
    compare.check_experiments(_experiments('baseline,lpl'))
  exps = _experiments('baseline,lpl,b=data.global_batch=8', **{'init.checkpoint': 'x', 'eval.reference': 'r.npz'})
  with pytest.raises(ConfigError, match="'baseline' and 'b' differ in their data section"):
    compare.check_experiments(exps)
  with pytest.raises(ConfigError, match='eval.reference is empty'):
    compare.check_experiments(_experiments('baseline,lpl', **{'init.checkpoint': 'x'}))
  with pytest.raises(ConfigError, match='at least 2 seeds'):
    compare.CompareSettings(seeds=1)


def test_seed_i_draws_the_same_batches_timesteps_and_noise_in_every_variant():
  exps = _experiments('baseline,lpl,lpl_tau2=lpl+lpl.tau=2')
  runs = {(n, s): compare.run_experiment(e, s) for n, e in exps.items() for s in (0, 1)}
  cfgs = {k: step_config(e, num_devices=1) for k, e in runs.items()}
  # The baseline has no LPL but stratifies its timesteps as the LPL run does: the same K rows per group.
  assert cfgs['baseline', 0].lpl is None and cfgs['lpl', 0].lpl is not None
  assert cfgs['baseline', 0].lpl_rows_per_group == cfgs['lpl', 0].lpl_rows_per_group > 0
  assert cfgs['baseline', 0].lpl_groups == cfgs['lpl', 0].lpl_groups
  # A plain baseline (outside a comparison) still draws unstratified timesteps.
  assert step_config(exps['baseline'], num_devices=1).lpl_rows_per_group == 0

  def draws(name, seed):
    exp = runs[name, seed]
    batch = next(iter(loop.data_pipeline(exp)[1]))
    keys = tuple(jax.random.split(jax.random.key(exp.seed), 4)[1:])  # the step's keys come from the seed alone
    z0 = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 4)), jnp.float32)
    cfg = cfgs[name, seed]
    rows = noise_batch(keys, {'latents': z0, 'labels': jnp.asarray(batch['labels'])}, cfg, cfg.lpl_groups or 1)
    return batch, rows

  for seed in (0, 1):
    base_batch, base_rows = draws('baseline', seed)
    lpl_batch, lpl_rows = draws('lpl', seed)
    for key in base_batch:
      np.testing.assert_array_equal(base_batch[key], lpl_batch[key])
    for a, b in zip(jax.tree.leaves(base_rows), jax.tree.leaves(lpl_rows), strict=True):
      np.testing.assert_array_equal(a, b)
    # Another threshold changes K, so the timesteps differ; batches and noise stay paired.
    tau_batch, tau_rows = draws('lpl_tau2', seed)
    np.testing.assert_array_equal(base_batch['images'], tau_batch['images'])
    np.testing.assert_array_equal(base_rows.eps, tau_rows.eps)
  other_batch, other_rows = draws('baseline', 1)
  assert not np.array_equal(draws('baseline', 0)[0]['images'], other_batch['images'])
  assert not np.array_equal(draws('baseline', 0)[1].eps, other_rows.eps)


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_a_stopped_comparison_continues_and_reports_paired_statistics(tmp_path, compilation_cache):
  env = common.cli_env(compilation_cache)
  pre = tmp_path / 'pre'
  common.run_main(env, 'pretrain', pre, '--config.total_steps=4', '--config.checkpoint_every=4')
  params = small_domain.SmallDomainCNN().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))['params']
  reference = tmp_path / 'ref.npz'
  references.write_reference(
    reference,
    source='embedded',
    resolution=32,
    features='small_domain',
    small_domain_params=ref_lib.make_extractor('small_domain', small_domain_params=params).params,
    num_images=32,
    batch_size=16,
    progress=False,
  )
  overrides = {
    'init.checkpoint': str(pre),
    'eval.reference': str(reference),
    'eval.features': 'small_domain',
    'eval.num_images': 16,
    'total_steps': 3,
    'checkpoint_every': 3,
    'log_every': 1,
    'progress': False,
    'num_sample_images': 4,
    'sample.steps': 2,
  }
  out = tmp_path / 'cmp'
  settings = compare.CompareSettings(seeds=2, fidelity_source='embedded', fidelity_images=4, bootstrap=20)
  done = []

  def stop_after_three(name, seed):
    done.append((name, seed))
    if len(done) == 3:
      raise _Stop

  with pytest.raises(_Stop):
    compare.run(str(out), _experiments('baseline,lpl', **overrides), settings, on_run=stop_after_three)
  assert done == [('baseline', 0), ('lpl', 0), ('baseline', 1)]
  assert not (out / 'report.md').exists()
  kept = {
    p: p.stat().st_mtime_ns
    for n, s in done
    for p in (out / 'runs' / n / f'seed_{s}').glob('**/*')
    if p.is_file() and ('checkpoints' in p.parts or p.name == 'result.json')
  }
  assert len(kept) > 3

  cmd = [
    sys.executable,
    '-m',
    'lpl_jax.compare',
    f'--config={common.DEMO}:post',
    f'--workdir={out}',
    '--seeds=2',
    '--variants=baseline,lpl',
    '--fidelity_source=embedded',
    '--fidelity_images=4',
    '--bootstrap=20',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
  ]
  proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.count('done earlier') == 3 and 'lpl, seed 1: post-training 3 steps' in proc.stdout
  assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing finished was trained or evaluated again

  # Paired: at step 1 both variants evaluated the same params on the same batch, timesteps and noise (two programs:
  # XLA may round the same forward differently, by float32 ulps).
  first = {
    (n, s): json.loads(open(out / 'runs' / n / f'seed_{s}' / 'metrics.jsonl').readline())
    for n in ('baseline', 'lpl')
    for s in (0, 1)
  }
  for s in (0, 1):
    np.testing.assert_allclose(first['baseline', s]['loss/diffusion'], first['lpl', s]['loss/diffusion'], rtol=1e-6)
    assert 'loss/lpl' in first['lpl', s] and 'loss/lpl' not in first['baseline', s]
  assert abs(first['baseline', 0]['loss/diffusion'] / first['baseline', 1]['loss/diffusion'] - 1) > 1e-3

  # The summary's statistics against SciPy on the per-seed values of the runs' own result files.
  results = json.load(open(out / 'results.json'))
  summary = results['summary']
  per_run = {
    (n, s): json.load(open(out / 'runs' / n / f'seed_{s}' / 'result.json')) for n in ('baseline', 'lpl') for s in (0, 1)
  }
  name = summary['distance_name']
  assert name == 'fd_small_domain'
  base = [per_run['baseline', s]['metrics'][name] for s in (0, 1)]
  lpl = [per_run['lpl', s]['metrics'][name] for s in (0, 1)]
  entry = summary['variants']['lpl']['metrics'][name]
  assert entry['values'] == lpl
  test = scipy.stats.ttest_rel(lpl, base)
  diff = entry['difference']
  np.testing.assert_allclose(diff['p_value'], test.pvalue, rtol=1e-9)
  ci = test.confidence_interval(0.95)
  np.testing.assert_allclose([diff['interval']['low'], diff['interval']['high']], [ci.low, ci.high], rtol=1e-9)
  for n in ('baseline', 'lpl'):
    r = per_run[n, 0]
    assert r['frechet_bootstrap']['std'] > 0 and r['frechet_bootstrap']['value'] == r['metrics'][name]
    curve = r['fidelity']
    assert len(curve['noise_levels']) == len(curve['metrics']['psnr']) == 8
  text = open(out / 'report.md').read()
  assert text.index('x0-hat fidelity') < text.index('Sample-set metrics')
  assert text.count('distinguishable from zero at 95%') >= 5 + 4  # a sentence per sample metric and curve metric
  for figure in ('fidelity.png', 'fidelity_difference.png', 'metrics_per_seed.png', 'samples.png'):
    assert f'figures/{figure}' in text and os.path.getsize(out / 'figures' / figure) > 1000


def test_a_run_of_another_variant_definition_is_not_reused(tmp_path):
  exps = _experiments('baseline,lpl,lpl_tau2=lpl+lpl.tau=2')
  ran = compare.run_experiment(exps['lpl'], 0)
  (tmp_path / 'config.json').write_text(ran.to_json())
  compare.check_same_run(str(tmp_path), 'lpl', ran)
  compare.check_same_run(str(tmp_path), 'lpl', ran.replace(log_every=7, eval={'every': 5}))  # not training fields
  with pytest.raises(ConfigError, match=r"trained as variant 'lpl' with another config \(lpl.tau -1.0 -> 2.0\)"):
    compare.check_same_run(str(tmp_path), 'lpl', compare.run_experiment(exps['lpl_tau2'], 0))
  with pytest.raises(ConfigError, match=r'\(seed 0 -> 1\)'):
    compare.check_same_run(str(tmp_path), 'lpl', compare.run_experiment(exps['lpl'], 1))
  compare.check_same_run(str(tmp_path / 'missing'), 'lpl', ran)  # nothing trained there yet
