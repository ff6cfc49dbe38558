"""`load_autoencoder`: a diffusers folder, a preset with random weights, or a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import autoencoder as ae
from tests.autoencoder.common import SMALL


def host_params(model, seed):
  """Random values for the shapes `init_params` creates, drawn with NumPy (no flax compilation)."""
  shapes = jax.eval_shape(lambda k: ae.init_params(model, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), shapes)


def test_loads_a_diffusers_folder(tmp_path):
  model = ae.AutoencoderKL(SMALL)
  params = host_params(model, 0)
  ae.save_diffusers(tmp_path / 'vae', model, params)
  loaded, loaded_params, random_weights = ae.load_autoencoder(str(tmp_path / 'vae'), dtype=jnp.bfloat16)
  assert not random_weights
  assert loaded.config == SMALL and loaded.dtype == jnp.bfloat16
  assert jax.tree.structure(loaded_params) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded_params), jax.tree.leaves(params)):
    assert isinstance(got, np.ndarray) and got.dtype == np.float32  # host arrays, float32 parameters
    np.testing.assert_array_equal(got, want)


def test_unknown_spec_names_it_and_the_presets(tmp_path):
  for spec in ('nope', str(tmp_path / 'missing_folder')):
    with pytest.raises(ValueError) as info:
      ae.load_autoencoder(spec)
    message = str(info.value)
    assert repr(spec) in message and 'neither a diffusers autoencoder folder' in message
    assert str(sorted(ae.PRESETS)) in message


@pytest.mark.slow  # two initialisations (jit and op by op), ~30 s each on 2 shared cores
def test_a_preset_has_the_random_weights_of_init_params(monkeypatch):
  monkeypatch.setitem(ae.PRESETS, 'small', SMALL)
  model, params, random_weights = ae.load_autoencoder('small', dtype=jnp.bfloat16, seed=3)
  assert random_weights and model.config == SMALL and model.dtype == jnp.bfloat16
  assert sorted(params) == ['decoder', 'encoder', 'post_quant_conv', 'quant_conv']
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  expected = ae.init_params(ae.AutoencoderKL(SMALL), jax.random.key(3))  # op by op, outside jit
  jax.tree.map(np.testing.assert_array_equal, params, expected)
