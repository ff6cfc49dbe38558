"""Evaluation during training: the reference file (writer, loader, their errors, the CLI), the metrics against NumPy,
SciPy and the `prdc` package, and a short demo run that evaluates every 2 steps (its rows, its best checkpoint, the
same params as a run without evaluation, a resume that keeps every evaluation once)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.linalg

from lpl_jax.eval import load_statistics, small_domain
from lpl_jax.eval import reference as ref_lib
from lpl_jax.eval.features import extract_features
from lpl_jax.train import evaluation, loop, references
from lpl_jax.train.errors import ConfigError
from lpl_jax.train.validate import validate
from tests.run import common

RES = 32  # demo_cpu.py's resolution
NUM_REF, NUM_PRDC = 48, 32
METRICS = ('eval/fd_small_domain', 'eval/precision', 'eval/recall', 'eval/density', 'eval/coverage')


def numpy_frechet(x, y):
  """Frechet distance of two feature sets, float64, with SciPy's sqrtm (as pytorch-fid; well-conditioned cases)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * root))


def exact_frechet(x, y):
  """Frechet distance of two feature sets from the features themselves, float64, exact for singular covariances:
  with A, B the centred features over sqrt(n - 1), sigma_1 = A^T A and sigma_2 = B^T B, and Tr((sigma_1 sigma_2)^(1/2))
  is the sum of the singular values of A B^T (its square's eigenvalues are those of sigma_1 sigma_2)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  a, b = ((z - z.mean(0)) / np.sqrt(len(z) - 1) for z in (x, y))
  trace_root = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b) - 2 * trace_root)


@pytest.fixture(scope='module')
def extractor():
  """The small-domain CNN with random weights: the tests need the same features on both sides, not good ones."""
  params = small_domain.SmallDomainCNN().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))['params']
  return ref_lib.make_extractor('small_domain', small_domain_params=params)


@pytest.fixture(scope='module')
def reference_file(tmp_path_factory, extractor):
  path = tmp_path_factory.mktemp('reference') / 'embedded32.npz'
  references.write_reference(
    path,
    source='embedded',
    resolution=RES,
    features='small_domain',
    small_domain_params=extractor.params,
    num_images=NUM_REF,
    num_prdc=NUM_PRDC,
    batch_size=16,
    progress=False,
  )
  return str(path)


def test_reference_round_trip(reference_file, extractor):
  ref = ref_lib.load_reference(reference_file, features='small_domain', resolution=RES)
  assert (ref.extractor, ref.resolution, ref.source, ref.num_images) == ('small_domain', RES, 'embedded', NUM_REF)
  # The same images, read again, through the extractor in one batch: the file's statistics and feature sample.
  batches, count = references.read_images('embedded', resolution=RES, num_images=NUM_REF)
  images = np.concatenate(list(batches))
  assert count == NUM_REF and images.shape == (NUM_REF, RES, RES, 3) and images.dtype == np.uint8
  assert len(np.unique(images.reshape(NUM_REF, -1), axis=0)) == NUM_REF, 'random crops: no two alike'
  feats = np.asarray(small_domain.small_domain_features(extractor.params, images), np.float64)
  assert ref.mu.dtype == ref.sigma.dtype == np.float64 and ref.sigma.shape == (128, 128)
  np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(ref.features, feats[:NUM_PRDC], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(ref.small_domain_params), jax.tree.leaves(extractor.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ref.weights_fingerprint == extractor.fingerprint()
  mu, sigma = load_statistics(reference_file)  # pytorch-fid's statistics format too
  np.testing.assert_array_equal(mu, ref.mu)
  np.testing.assert_array_equal(sigma, ref.sigma)


def test_reference_errors(reference_file, extractor, tmp_path):
  missing = str(tmp_path / 'nowhere.npz')
  with pytest.raises(FileNotFoundError, match='--write_reference') as info:
    ref_lib.load_reference(missing, features='small_domain')
  assert repr(missing) in str(info.value)
  with pytest.raises(ValueError, match=r'holds small_domain features, but the evaluation extracts inception') as info:
    ref_lib.load_reference(reference_file, features='inception')
  assert repr(reference_file) in str(info.value) and '--features=inception' in str(info.value)
  with pytest.raises(ValueError, match=r'written from 32 px images, but the samples are 64 px'):
    ref_lib.check_reference(reference_file, features='small_domain', resolution=64)
  stats = str(tmp_path / 'stats.npz')
  np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
  with pytest.raises(ValueError, match='is not a reference file'):
    ref_lib.load_reference(stats, features='small_domain')
  other = ref_lib.make_extractor('small_domain', small_domain_params=jax.tree.map(lambda x: 2 * x, extractor.params))
  with pytest.raises(ValueError, match='are not the small_domain weights'):
    ref_lib.check_weights(ref_lib.load_reference(reference_file, features='small_domain'), other)

  # The trainer finds them before anything compiles, naming the field.
  def exp(**kw):
    return common.experiment(
      'demo_cpu.py', 'pretrain', **{'eval.every': 2, 'eval.reference': reference_file, 'eval.num_images': 16, **kw}
    )

  validate(exp(**{'eval.features': 'small_domain'}))
  cases = [
    ({'eval.features': 'inception', 'eval.inception_weights': reference_file}, 'holds small_domain features'),
    ({'eval.features': 'small_domain', 'data.resolution': 64}, 'written from 32 px images'),
    ({'eval.features': 'small_domain', 'eval.reference': missing}, f'eval.reference={missing!r} is not a file'),
    ({'eval.features': 'small_domain', 'eval.num_images': 5}, 'eval.num_images=5; density/coverage'),
  ]
  for overrides, message in cases:
    with pytest.raises(ConfigError, match='eval') as info:
      validate(exp(**overrides))
    assert message in str(info.value), (message, str(info.value))


def test_metrics_equal_numpy_scipy_and_the_prdc_package(tmp_path, extractor):
  """`compare` on features: the Frechet distance against SciPy's sqrtm in float64, the k-NN metrics against the
  `prdc` package on the first M real features (M = the fake count)."""
  prdc_package = pytest.importorskip('prdc')
  rng = np.random.default_rng(0)  # 16-d, more samples than dimensions: well-conditioned covariances for sqrtm
  real = rng.normal(size=(300, 16)).astype(np.float32) @ (np.eye(16) + 0.3 * rng.normal(size=(16, 16))).astype(
    np.float32
  )
  fake = (1.3 * rng.normal(size=(200, 16)) + 0.4).astype(np.float32)
  path = tmp_path / 'ref.npz'
  ref_lib.save_reference(path, real, extractor=extractor, resolution=RES, source='embedded', num_prdc=150)
  ref = ref_lib.load_reference(path, features='small_domain')
  got = ref_lib.compare(ref, fake[:150])
  expected_fd = numpy_frechet(fake[:150], real)  # the reference's mu/sigma are of all 300
  print(f'FD {got["fd_small_domain"]:.12f}, NumPy/SciPy {expected_fd:.12f}')
  assert got['fd_small_domain'] == pytest.approx(expected_fd, rel=1e-9)
  assert exact_frechet(fake[:150], real) == pytest.approx(expected_fd, rel=1e-9)  # the helper the run test uses
  pr, dc = (prdc_package.compute_prdc(real[:150], fake[:150], k) for k in (3, 5))
  for name, expected in (('precision', pr), ('recall', pr), ('density', dc), ('coverage', dc)):
    assert got[name] == pytest.approx(float(expected[name]), abs=1e-12), name
  assert 0 < got['precision'] < 1 and 0 < got['coverage'] < 1, got  # not a degenerate case
  # More fake features than stored real ones: all 150 real ones.
  many = ref_lib.compare(ref, fake)
  assert many['recall'] == pytest.approx(float(prdc_package.compute_prdc(real[:150], fake, 3)['recall']), abs=1e-12)


def test_write_reference_command_line(reference_file, extractor, tmp_path):
  params = tmp_path / 'extractor.npz'
  small_domain.save_params(params, extractor.params)
  out = tmp_path / 'cli.npz'
  cmd = [sys.executable, '-m', 'lpl_jax.evaluate', f'--write_reference={out}', '--features=small_domain']
  good = subprocess.Popen(
    [*cmd, f'--small_domain={params}', f'--resolution={RES}', f'--num_images={NUM_REF}', f'--num_prdc={NUM_PRDC}']
    + ['--batch_size=16', '--noprogress'],
    cwd=common.ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=common.ROOT),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=common.ROOT)
  bad = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'Flag --resolution must have a value other than None.' in bad.stderr, bad.stderr
  stdout, stderr = good.communicate(timeout=300)
  assert good.returncode == 0, stderr[-3000:]
  assert f'wrote {out}: small_domain features of {NUM_REF} {RES} px images' in stdout
  cli, lib = (ref_lib.load_reference(p, features='small_domain', resolution=RES) for p in (out, reference_file))
  np.testing.assert_allclose(cli.mu, lib.mu, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(cli.features, lib.features, rtol=1e-6, atol=1e-7)


def test_best_keeper_keeps_the_lowest_and_sets_aside_a_best_from_a_redone_history(tmp_path):
  folder = tmp_path / 'checkpoints' / 'best'
  params = {'w': jnp.arange(4.0), 'b': jnp.ones(2)}
  keeper = evaluation.BestKeeper(folder, start=0, metric='eval/fid')
  assert keeper.offer(2, {'eval/fid': 5.0}, params)
  assert keeper.offer(4, {'eval/fid': 3.0}, jax.tree.map(lambda x: x + 1, params))
  assert not keeper.offer(6, {'eval/fid': 4.0}, params) and not keeper.offer(8, {'eval/fid': 3.0}, params)
  assert sorted(os.listdir(folder)) == ['4', 'best.json']
  kept, info = evaluation.load_best(folder, params)
  np.testing.assert_array_equal(np.asarray(kept['w']), np.arange(4.0) + 1)
  assert (
    (info['step'], info['value'])
    == (4, 3.0)
    == tuple(json.loads((folder / 'best.json').read_text())[k] for k in ('step', 'value'))
  )
  # Resumed at step 5: the best of step 4 stands, and only a lower distance replaces it.
  resumed = evaluation.BestKeeper(folder, start=5, metric='eval/fid')
  assert (resumed.step, resumed.value) == (4, 3.0) and not resumed.offer(6, {'eval/fid': 3.5}, params)
  # Resumed at step 3: step 4 is being redone, so its best is set aside and the next evaluation is the best so far.
  redo = evaluation.BestKeeper(folder, start=3, metric='eval/fid')
  assert (redo.step, redo.value) == (None, float('inf')) and sorted(os.listdir(folder)) == []
  assert [name.split('-')[0] for name in os.listdir(tmp_path / 'checkpoints' / evaluation.STALE)] == ['4']
  assert redo.offer(4, {'eval/fid': 9.0}, params) and evaluation.load_best(folder, params)[1]['value'] == 9.0


def _ema(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))['ema_params']


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _eval_rows(workdir):
  return {r['step']: r for r in _rows(workdir) if any(k.startswith('eval/') for k in r)}


@pytest.mark.slow
def test_runs_evaluate_keep_the_best_and_train_the_same(reference_file, tmp_path, monkeypatch, compilation_cache):
  """A 4-step demo run evaluating every 2 steps against 16 samples: `eval/*` rows at steps 2 and 4, the best EMA
  params kept, its numbers those of an independent computation; the params equal a run without evaluation; a resume
  to step 6 keeps each evaluation once (one lost between a checkpoint and its evaluation is made up)."""
  settings = dict(common.LOOP_SETTINGS, num_sample_images=16)  # the grids' sampler shape is the evaluation's
  on = {'eval.every': 2, 'eval.features': 'small_domain', 'eval.reference': reference_file, 'eval.num_images': 16}
  started = []
  start = evaluation.start
  monkeypatch.setattr(evaluation, 'start', lambda *a, **kw: started.append(start(*a, **kw)) or started[-1])

  evaluated, plain = str(tmp_path / 'eval'), str(tmp_path / 'plain')
  assert loop.train_and_evaluate(
    common.experiment('demo_cpu.py', 'pretrain', total_steps=4, **settings, **on), evaluated
  ).finished
  assert loop.train_and_evaluate(
    common.experiment('demo_cpu.py', 'pretrain', total_steps=4, **settings), plain
  ).finished
  assert started[1] is None  # eval.every = 0: nothing built

  # Evaluation never changes the trajectory: every leaf of the state equal, bitwise.
  for step in (2, 4):
    a = ocp.StandardCheckpointer().restore(os.path.join(evaluated, 'checkpoints', str(step), 'state'))
    b = ocp.StandardCheckpointer().restore(os.path.join(plain, 'checkpoints', str(step), 'state'))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r['step'] for r in _rows(evaluated) if 'loss/total' in r] == [r['step'] for r in _rows(plain)] == [1, 2, 3, 4]

  rows = _eval_rows(evaluated)
  assert sorted(rows) == [2, 4], rows
  for row in rows.values():
    assert set(METRICS) | {'step', 'eval/seconds'} == set(row), row
    assert np.isfinite(row['eval/fd_small_domain']) and row['eval/fd_small_domain'] > 0
  assert common.tensorboard_steps(os.path.join(evaluated, 'tensorboard'), 'eval/fd_small_domain') == [2, 4]

  # The best: the lower distance's step, its EMA params bitwise, best.json saying so.
  best_step = min(rows, key=lambda s: rows[s]['eval/fd_small_domain'])
  best_dir = os.path.join(evaluated, 'checkpoints', 'best')
  info = json.loads(open(os.path.join(best_dir, 'best.json')).read())
  assert (info['step'], info['metric']) == (best_step, 'eval/fd_small_domain')
  assert info['value'] == rows[best_step]['eval/fd_small_domain']
  assert sorted(int(s) for s in os.listdir(best_dir) if s.isdigit()) == [best_step]
  want = _ema(evaluated, best_step)
  params, saved_info = evaluation.load_best(best_dir, want)
  assert saved_info['step'] == best_step
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert common.checkpoint_steps(evaluated) == [2, 4], 'best/ is not a step'

  # The row's numbers from the same samples, independently: host features, NumPy/SciPy, the prdc package.
  in_loop = started[0]
  ev = in_loop.evaluator
  assert ev.traces == 1, 'the feature extractor compiled once for both evaluations'
  assert ev._generate._cache_size() == 1, 'one compiled sampler for the grids and both evaluations'
  images = ev.images(want)
  assert images.shape == (16, RES, RES, 3) and images.dtype == np.uint8
  ref = ev.reference
  feats = extract_features(
    images, small_domain.small_domain_features, 16, params=ref.small_domain_params, progress=False
  )
  np.testing.assert_array_equal(feats, ev.features(want))
  batches, _ = references.read_images('embedded', resolution=RES, num_images=NUM_REF)  # the reference's own images
  real = extract_features(
    np.concatenate(list(batches)),
    small_domain.small_domain_features,
    16,
    params=ref.small_domain_params,
    progress=False,
  )
  fd = exact_frechet(feats, real)
  print(f'eval/fd_small_domain {rows[best_step]["eval/fd_small_domain"]:.12f}, NumPy {fd:.12f}')
  assert rows[best_step]['eval/fd_small_domain'] == pytest.approx(fd, rel=1e-9)
  prdc_package = pytest.importorskip('prdc')
  pr, dc = (prdc_package.compute_prdc(ref.features[:16], feats, k) for k in (3, 5))
  for name, expected in (('precision', pr), ('recall', pr), ('density', dc), ('coverage', dc)):
    assert rows[best_step][f'eval/{name}'] == pytest.approx(float(expected[name]), abs=1e-12), name

  # Resume to 6 after a kill between checkpoint 4 and its evaluation (its row lost) that had logged an orphan row 5.
  path = os.path.join(evaluated, 'metrics.jsonl')
  kept = [r for r in _rows(evaluated) if not (r['step'] == 4 and 'eval/precision' in r)]
  kept.append({'step': 5, 'eval/fd_small_domain': -1.0})
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  assert loop.train_and_evaluate(
    common.experiment('demo_cpu.py', 'pretrain', total_steps=6, **settings, **on), evaluated
  ).finished
  again = _eval_rows(evaluated)
  assert sorted(again) == [2, 4, 6], again
  assert again[4]['eval/fd_small_domain'] == rows[4]['eval/fd_small_domain'], 'step 4 evaluated again, the same'
  assert started[2].evaluator.traces == 1
  # (TensorBoard still has the first step-4 event: only its jsonl row was removed above, a real kill takes both.)
  assert set(common.tensorboard_steps(os.path.join(evaluated, 'tensorboard'), 'eval/fd_small_domain')) == {2, 4, 6}
