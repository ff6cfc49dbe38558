"""`evaluate_samples` with a random-weight Inception file against pytorch-fid + prdc, and `python -m lpl_jax.evaluate`
in subprocesses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from prdc import compute_prdc
from pytorch_fid.fid_score import calculate_frechet_distance

from lpl_jax import eval as lpl_eval
from tests.eval.conftest import torch_fid_features
from tests.eval.test_inception import BATCH, SIZE

pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # N < 2048: singular covariances

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
METRICS = ('fid', 'precision', 'recall', 'density', 'coverage')


def _batch(path, n, seed, **extra):
  images = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
  np.savez(path, images, **extra)  # ADM layout: arr_0
  return images


def _cli(*args):
  cmd = [sys.executable, '-m', 'lpl_jax.evaluate', *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stats(x):
  return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.mark.slow  # square roots of 2048x2048 matrices (pytorch-fid's sqrtm, ours by eigh): 30-60 s on 2 shared cores
def test_matches_pytorch_fid_and_prdc(random_inception, tmp_path):
  weights, torch_model = random_inception
  samples = _batch(tmp_path / 'samples.npz', 7, seed=1)
  ref = _batch(tmp_path / 'ref.npz', 8, seed=2, mu=np.zeros(2048), sigma=np.eye(2048))  # stored stats: unused
  out = tmp_path / 'metrics.json'
  metrics = lpl_eval.evaluate_samples(
    tmp_path / 'samples.npz', tmp_path / 'ref.npz', weights, out=out, batch_size=BATCH, progress=False
  )
  assert json.loads(out.read_text()) == metrics

  fake, real = torch_fid_features(torch_model, samples), torch_fid_features(torch_model, ref)
  expected_fid = float(calculate_frechet_distance(*_stats(fake), *_stats(real)))
  print(f'FID {metrics["fid"]:.6f}, pytorch-fid on its own features {expected_fid:.6f}')
  # Features agree to ~1e-6 relative; with 7-8 samples in 2048-d pytorch-fid's sqrtm of the singular product is
  # itself only approximate, hence 1e-3 relative here (test_fid checks the distance against exact answers).
  assert metrics['fid'] == pytest.approx(expected_fid, rel=1e-3)
  pr, dc = compute_prdc(real, fake, 3), compute_prdc(real, fake, 5)
  for name, expected in (('precision', pr), ('recall', pr), ('density', dc), ('coverage', dc)):
    assert metrics[name] == pytest.approx(float(expected[name]), abs=1e-12), name
  assert metrics['num_samples'] == 7 and metrics['num_reference'] == 8
  assert metrics['nearest_k_pr'] == 3 and metrics['nearest_k_dc'] == 5

  # A statistics-only reference (pytorch-fid's mu/sigma format): FID against those, no k-NN metrics.
  np.savez(tmp_path / 'stats.npz', mu=_stats(real)[0], sigma=_stats(real)[1])
  only_fid = lpl_eval.evaluate_samples(
    tmp_path / 'samples.npz', tmp_path / 'stats.npz', weights, batch_size=BATCH, progress=False
  )
  assert only_fid['fid'] == pytest.approx(expected_fid, rel=1e-3)
  assert only_fid['precision'] is None and only_fid['coverage'] is None


@pytest.mark.slow  # a fresh process: Inception compiled again, and one 2048x2048 square root
def test_cli_prints_and_writes_the_metrics(random_inception, tmp_path):
  weights, _ = random_inception
  _batch(tmp_path / 'samples.npz', 7, seed=1)
  _batch(tmp_path / 'ref.npz', 8, seed=2)
  out = tmp_path / 'metrics.json'
  proc = _cli(
    f'--samples={tmp_path / "samples.npz"}',
    f'--ref={tmp_path / "ref.npz"}',
    f'--inception={weights}',
    f'--out={out}',
    f'--batch_size={BATCH}',
    '--noprogress',
  )
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  metrics = json.loads(out.read_text())
  printed = {line.split(':')[0].strip(): line.split(':')[1].strip() for line in stdout.splitlines() if ':' in line}
  for name in METRICS:  # each metric on its own line, as written to the JSON
    assert float(printed[name]) == pytest.approx(metrics[name], abs=1e-6), (name, stdout)
  assert f'wrote {out}' in stdout
  assert metrics['num_samples'] == 7 and metrics['num_reference'] == 8


def test_errors(tmp_path):
  """Bad input is found before the (slow) weight import: by the library as an exception, by the command line as one
  `error: ...` line and exit status 2."""
  _batch(tmp_path / 'samples.npz', 7, seed=3)
  _batch(tmp_path / 'few.npz', 5, seed=4)
  np.savez(tmp_path / 'float.npz', np.zeros((7, SIZE, SIZE, 3), np.float32))
  samples, few, floats = (str(tmp_path / f'{n}.npz') for n in ('samples', 'few', 'float'))
  missing = str(tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
  nowhere = str(tmp_path / 'nowhere.npz')
  cases = [  # (library arguments, the same on the command line, the error)
    ((samples, samples, missing), {}, [], FileNotFoundError, f'Inception weights file {missing!r} does not'),
    ((floats, samples, missing), {}, [], ValueError, 'expected uint8 [N, H, W, 3] images'),
    ((few, samples, missing), {}, [], ValueError, '5 samples are too few for nearest_k=5: need at least 6'),
    ((samples, samples, missing), {'nearest_k_dc': 0}, ['--nearest_k_dc=0'], ValueError, 'nearest_k_dc must be >= 1'),
    ((samples, nowhere, missing), {}, [], FileNotFoundError, f'reference file {nowhere!r} does not exist'),
  ]
  procs = []
  for (s, r, w), kwargs, flags, error, message in cases:
    with pytest.raises(error) as info:
      lpl_eval.evaluate_samples(s, r, w, **kwargs)
    assert message in str(info.value), (message, str(info.value))
    procs.append((_cli(f'--samples={s}', f'--ref={r}', f'--inception={w}', *flags), message))
  procs.append(
    (
      _cli(f'--samples={samples}', f'--ref={samples}'),
      'flag --inception=None: Flag --inception must have a value other than None.',
    )
  )
  procs.append(
    (
      _cli(f'--samples={samples}', f'--ref={samples}', f'--inception={missing}', '--ref_stats=both'),
      'flag --ref_stats=both: value should be one of <computed|stored>',
    )
  )
  for proc, message in procs:  # the processes ran side by side
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (message, proc.returncode, stderr[-3000:])
    assert 'Traceback' not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], (message, stderr[-3000:])
