"""`python -m lpl_jax.evaluate` end to end with a random-weight Inception file, against pytorch-fid + prdc."""

import json

import numpy as np
import pytest
from prdc import compute_prdc
from pytorch_fid.fid_score import calculate_frechet_distance

from lpl_jax import evaluate
from tests.eval.conftest import torch_fid_features
from tests.eval.test_inception import BATCH, SIZE

pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # N < 2048: singular covariances


def _batch(path, n, seed, **extra):
  images = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
  np.savez(path, images, **extra)  # ADM layout: arr_0
  return images


@pytest.mark.slow  # three square roots of 2048x2048 matrices (scipy's sqrtm): 30-60 s each on 2 shared cores
def test_cli_matches_pytorch_fid_and_prdc(random_inception, tmp_path, capsys):
  weights, torch_model = random_inception
  samples = _batch(tmp_path / 'samples.npz', 7, seed=1)
  ref = _batch(tmp_path / 'ref.npz', 8, seed=2, mu=np.zeros(2048), sigma=np.eye(2048))  # stored stats: unused
  out = tmp_path / 'metrics.json'
  evaluate.main([f'--samples={tmp_path / "samples.npz"}', f'--ref={tmp_path / "ref.npz"}', f'--inception={weights}',
                 f'--out={out}', f'--batch_size={BATCH}', '--no_progress'])
  printed = capsys.readouterr().out
  metrics = json.loads(out.read_text())
  for name in ('fid', 'precision', 'recall', 'density', 'coverage'):
    assert any(line.strip().startswith(f'{name}:') for line in printed.splitlines()), printed

  fake, real = torch_fid_features(torch_model, samples), torch_fid_features(torch_model, ref)
  stats = lambda x: (x.mean(axis=0), np.cov(x, rowvar=False))
  expected_fid = float(calculate_frechet_distance(*stats(fake), *stats(real)))
  print(f'CLI FID {metrics["fid"]:.6f}, pytorch-fid on its own features {expected_fid:.6f}')
  # Features agree to ~1e-6 relative; with 7-8 samples in 2048-d the square root of the singular product amplifies
  # that, hence 1e-3 relative here (test_fid checks the distance itself to 1e-6 on the same statistics).
  assert metrics['fid'] == pytest.approx(expected_fid, rel=1e-3)
  pr, dc = compute_prdc(real, fake, 3), compute_prdc(real, fake, 5)
  for name, expected in (('precision', pr), ('recall', pr), ('density', dc), ('coverage', dc)):
    assert metrics[name] == pytest.approx(float(expected[name]), abs=1e-12), name
  assert metrics['num_samples'] == 7 and metrics['num_reference'] == 8
  assert metrics['nearest_k_pr'] == 3 and metrics['nearest_k_dc'] == 5

  # A statistics-only reference (pytorch-fid's mu/sigma format): FID against those, no k-NN metrics.
  np.savez(tmp_path / 'stats.npz', mu=stats(real)[0], sigma=stats(real)[1])
  only_fid = evaluate.evaluate([f'--samples={tmp_path / "samples.npz"}', f'--ref={tmp_path / "stats.npz"}',
                                f'--inception={weights}', f'--batch_size={BATCH}', '--no_progress'])
  assert only_fid['fid'] == pytest.approx(expected_fid, rel=1e-3)
  assert only_fid['precision'] is None and only_fid['coverage'] is None


def test_cli_errors(tmp_path, capsys):
  _batch(tmp_path / 'samples.npz', 7, seed=3)
  _batch(tmp_path / 'few.npz', 5, seed=4)
  np.savez(tmp_path / 'float.npz', np.zeros((7, SIZE, SIZE, 3), np.float32))
  missing = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  cases = [
      (['--samples=SAMPLES', f'--inception={missing}'], f'error: Inception weights file {str(missing)!r} does not'),
      (['--samples=FLOAT', f'--inception={missing}'], 'expected uint8 [N, H, W, 3] images'),
      (['--samples=FEW', f'--inception={missing}'], '5 samples are too few for nearest_k=5: need at least 6'),
      (['--samples=SAMPLES', f'--inception={missing}', '--nearest_k_dc=0'], '--nearest_k_dc must be >= 1'),
  ]
  for args, message in cases:
    args = [a.replace('SAMPLES', str(tmp_path / 'samples.npz')).replace('FLOAT', str(tmp_path / 'float.npz'))
            .replace('FEW', str(tmp_path / 'few.npz')) for a in args]
    with pytest.raises(SystemExit) as e:
      evaluate.main(args + [f'--ref={tmp_path / "samples.npz"}'])
    assert message in str(e.value), (message, str(e.value))
  with pytest.raises(SystemExit, match=r"reference file '.*nowhere.npz' does not exist"):
    evaluate.main([f'--samples={tmp_path / "samples.npz"}', f'--ref={tmp_path / "nowhere.npz"}',
                   f'--inception={missing}'])
