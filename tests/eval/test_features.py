"""Batched, padded and sharded feature extraction returns every image's features once, in order."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lpl_jax import eval as lpl_eval

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def colour_moments(params, images):
  """A feature function with an obvious NumPy counterpart: per-channel mean and mean square, times a weight."""
  x = images.astype(jnp.float32) / 255.0
  return params['w'] * jnp.concatenate([x.mean(axis=(1, 2)), (x * x).mean(axis=(1, 2))], axis=-1)


def numpy_colour_moments(w, images):
  x = images.astype(np.float64) / 255.0
  return w * np.concatenate([x.mean(axis=(1, 2)), (x * x).mean(axis=(1, 2))], axis=-1)


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize('n', [1, 7, 8, 9, 23])
def test_array_input_padded_and_unpadded(n):
  images, params = _images(n), {'w': jnp.float32(2.0)}
  out = lpl_eval.extract_features(images, colour_moments, 8, params=params, progress=False)
  assert out.shape == (n, 6) and out.dtype == np.float32
  np.testing.assert_allclose(out, numpy_colour_moments(2.0, images), rtol=1e-5)


def test_iterable_of_uneven_chunks_and_npz_path(tmp_path):
  images = _images(29, seed=1)
  chunks = (images[a:b] for a, b in ((0, 3), (3, 4), (4, 20), (20, 29)))
  expected = numpy_colour_moments(1.0, images)
  no_params = lambda x: colour_moments({'w': 1.0}, x)
  np.testing.assert_allclose(lpl_eval.extract_features(chunks, no_params, 5, progress=False), expected, rtol=1e-5)
  lpl_eval.save_npz_images(tmp_path / 'samples.npz', images)
  np.testing.assert_allclose(
    lpl_eval.extract_features(str(tmp_path / 'samples.npz'), no_params, 5, progress=False), expected, rtol=1e-5
  )


def test_explicit_mesh_and_layout_errors():
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('batch',))
  images = _images(5)
  out = lpl_eval.extract_features(images, colour_moments, 4, mesh, params={'w': jnp.float32(1.0)}, progress=False)
  np.testing.assert_allclose(out, numpy_colour_moments(1.0, images), rtol=1e-5)
  with pytest.raises(ValueError, match='got dtype float32'):
    lpl_eval.extract_features(images.astype(np.float32), colour_moments, 4, params={'w': 1.0}, progress=False)
  with pytest.raises(ValueError, match='NCHW'):
    lpl_eval.extract_features(np.zeros((2, 3, 8, 8), np.uint8), colour_moments, 4, params={'w': 1.0})


def test_sharded_over_four_devices():
  """A fresh process with 4 host devices: the default mesh splits each batch of 8 over them."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from lpl_jax import eval as lpl_eval
      from tests.eval.test_features import colour_moments, numpy_colour_moments, _images
      assert jax.device_count() == 4
      mesh = lpl_eval.default_mesh()
      assert mesh is not None and mesh.devices.size == 4
      seen = []
      def spy(params, x):
        jax.debug.inspect_array_sharding(x, callback=seen.append)
        return colour_moments(params, x)
      images = _images(13)
      out = lpl_eval.extract_features(images, spy, 8, params={'w': jnp.float32(3.0)}, progress=False)
      assert seen and all(len(s.device_set) == 4 and not s.is_fully_replicated for s in seen), seen
      np.testing.assert_allclose(out, numpy_colour_moments(3.0, images), rtol=1e-5)
      try:
        lpl_eval.extract_features(images, spy, 6, params={'w': 1.0}, progress=False)
        raise AssertionError('batch_size 6 on 4 devices must be refused')
      except ValueError as e:
        assert 'multiple of' in str(e), e
      print('OK')
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run(
    [sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0 and result.stdout.strip().endswith('OK'), result.stderr[-3000:]
