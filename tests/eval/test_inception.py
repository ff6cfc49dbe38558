"""The Flax FID Inception against pytorch-fid's own modules (random weights, state dict saved with torch.save)."""

import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpl_jax import eval as lpl_eval
from lpl_jax.eval import inception
from tests.eval.conftest import torch_fid_features

TOL = 1e-4
# Shared with the CLI test: same batch shape, so the network compiles once per test session.
BATCH, SIZE = 2, 32


def rel_err(actual, expected) -> float:
  """max |a - e| / max |e|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_features_match_pytorch_fid(random_inception):
  path, torch_model = random_inception
  _, params = lpl_eval.load_inception(path)
  images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
  features = jax.jit(lpl_eval.fid_features)(params, images)
  expected = torch_fid_features(torch_model, images)
  assert features.shape == (BATCH, inception.FEATURE_DIM)
  err = rel_err(features, expected)
  print(f'Inception pool3 features, max|jax - pytorch-fid| / max|pytorch-fid| = {err:.2e}')
  assert err <= TOL
  # The random network still separates its inputs: a constant output would make the comparison vacuous.
  assert np.max(np.abs(expected[0] - expected[1])) > 0.01 * np.max(np.abs(expected))


@pytest.mark.parametrize('shape', [(512, 512), (64, 96), (300, 298), (299, 299), (17, 640)])
def test_resize_matches_torch_interpolate(shape):
  x = np.random.default_rng(1).uniform(size=(2, *shape, 3)).astype(np.float32)
  out = jax.jit(inception.resize_bilinear)(x)
  expected = (
    F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode='bilinear', align_corners=False)
    .numpy()
    .transpose(0, 2, 3, 1)
  )
  # float32 sums in another order: a few ulps of the [0, 1] pixel range.
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_preprocess_scales_uint8_like_to_tensor():
  u8 = np.arange(2 * 299 * 299 * 3, dtype=np.int64).reshape(2, 299, 299, 3) % 256
  out = inception.preprocess(u8.astype(np.uint8))
  np.testing.assert_allclose(out, 2 * (u8 / 255.0) - 1, atol=1e-6)
  np.testing.assert_allclose(inception.preprocess((u8 / 255.0).astype(np.float32)), out, atol=1e-6)
  with pytest.raises(ValueError, match=r'RGB images \[B, H, W, 3\]'):
    inception.preprocess(np.zeros((1, 3, 32, 32), np.uint8))


def test_npz_and_safetensors_exports_hold_the_same_weights(random_inception, tmp_path):
  path, _ = random_inception
  state = torch.load(path, weights_only=True)
  _, params = lpl_eval.load_inception(path)
  for ext in ('npz', 'safetensors'):
    lpl_eval.convert_weights(path, tmp_path / f'w.{ext}')
    _, converted = lpl_eval.load_inception(tmp_path / f'w.{ext}')
    jax.tree.map(np.testing.assert_array_equal, converted, params)
  # Layouts: conv [O, I, kh, kw] -> [kh, kw, I, O]; BN running statistics kept as parameters.
  np.testing.assert_array_equal(
    params['Mixed_6b']['branch7x7_2']['conv']['kernel'],
    state['Mixed_6b.branch7x7_2.conv.weight'].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    params['Mixed_7c']['branch_pool']['bn']['var'], state['Mixed_7c.branch_pool.bn.running_var'].numpy()
  )


def test_strict_import_names_every_problem(random_inception):
  path, _ = random_inception
  state = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
  del state['Mixed_5b.branch1x1.bn.running_mean']
  state['Mixed_5b.extra.weight'] = np.zeros(3, np.float32)
  state['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(lpl_eval.WeightsMismatchError) as e:
    inception.convert_state_dict(state)
  message = str(e.value)
  assert '1 missing tensor(s):\n    Mixed_5b.branch1x1.bn.running_mean (64,)' in message
  assert '1 unexpected tensor(s):\n    Mixed_5b.extra.weight (3,)' in message
  assert 'fc.weight: file has (1000, 2048), FID Inception expects (1008, 2048)' in message


def test_missing_weights_file_is_named(tmp_path):
  missing = tmp_path / 'nowhere' / inception.WEIGHTS_FILENAME
  with pytest.raises(FileNotFoundError, match=str(missing)):
    lpl_eval.load_inception(missing)


def test_pth_without_torch_says_how_to_convert(random_inception, monkeypatch):
  path, _ = random_inception
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match='needs PyTorch.*convert_weights'):
    lpl_eval.load_inception(path)
