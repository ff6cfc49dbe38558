"""The small-domain extractor (NOT Inception) learns the photographs, round-trips its parameters, and its Frechet
distance separates crops of different photographs."""

import numpy as np
import pytest

from lpl_jax.eval import small_domain as sd


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp('small_domain') / 'extractor.npz'
  params, info = sd.train_small_domain_extractor(steps=50, num_crops=512, path=path, verbose=False)
  return path, params, info


def test_learns_to_tell_the_photographs_apart(trained):
  _, _, info = trained
  # 12 classes: chance is 0.083. Measured 0.8-0.9 after 40-60 steps; 0.5 leaves room for other seeds and platforms.
  assert info['heldout_accuracy'] > 0.5, info
  assert np.isfinite(info['final_loss'])


def test_params_round_trip_with_label(trained, tmp_path):
  path, params, _ = trained
  loaded = sd.load_params(path)
  np.testing.assert_array_equal(loaded['penultimate']['kernel'], params['penultimate']['kernel'])
  with np.load(path) as data:
    assert 'NOT Inception-FID' in str(data['__label__'])
  images, _ = sd.photo_crops(np.random.default_rng(3), 4)
  np.testing.assert_array_equal(sd.small_domain_features(loaded, images), sd.small_domain_features(params, images))
  with pytest.raises(FileNotFoundError, match='nowhere.npz'):
    sd.load_params(tmp_path / 'nowhere.npz')
  np.savez(tmp_path / 'other.npz', __label__='x', **{'conv_0/kernel': np.zeros((3, 3, 3, 8))})
  with pytest.raises(ValueError, match='does not match SmallDomainCNN'):
    sd.load_params(tmp_path / 'other.npz')


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # the one-photo set repeats its crops
def test_frechet_distance_separates_photo_sets(trained):
  _, params, _ = trained
  a, labels_a = sd.photo_crops(np.random.default_rng(10), 96)
  b, _ = sd.photo_crops(np.random.default_rng(11), 96)
  one_photo = a[labels_a == labels_a[0]]
  one_photo = np.concatenate([one_photo] * (96 // len(one_photo) + 1))[:96]
  same = sd.small_domain_frechet_distance(params, a, b)
  different = sd.small_domain_frechet_distance(params, a, one_photo)
  assert 0.0 <= same < 0.5 * different, (same, different)
  assert sd.small_domain_features(params, a[:3]).shape == (3, sd.FEATURE_DIM)
  # Other sizes are resized to the 64x64 training resolution.
  assert sd.small_domain_features(params, a[:3, :40, :40]).shape == (3, sd.FEATURE_DIM)
