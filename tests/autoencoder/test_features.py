"""Decoder feature taps: shapes, depth, remat, bf16, no recompilation, input checks."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import autoencoder as ae
from tests.tiny_autoencoder import tiny_autoencoder


@pytest.fixture(scope='module')
def tiny():
  return tiny_autoencoder()


def _features(model, params, z, n, **kw):
  return model.apply({'params': params}, z, n, method=model.decoder_features, **kw)


def test_sd_shapes_match_the_documented_taps():
  """docs/autoencoder.md: for a 32x32 latent, mid 32x32x512, up0 64x64x512, up1 128x128x512, up2 256x256x256,
  up3 256x256x128."""
  model = ae.from_preset('sdxl')
  params = jax.eval_shape(lambda: ae.init_params(model, jax.random.key(0)))
  z = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
  feats = jax.eval_shape(lambda p, z: _features(model, p, z, 4), params, z)
  assert [f.shape for f in feats] == [
    (2, 32, 32, 512),
    (2, 64, 64, 512),
    (2, 128, 128, 512),
    (2, 256, 256, 256),
    (2, 256, 256, 128),
  ]
  recon = jax.eval_shape(lambda p, z: model.apply({'params': p}, z, method=model.decode), params, z)
  assert recon.shape == (2, 256, 256, 3)


@pytest.mark.parametrize('num_blocks', [0, 1, 2, 4])
def test_only_needed_blocks_are_computed(tiny, num_blocks):
  """Running with the parameters of deeper blocks (and the output convs) removed proves they are never touched."""
  model, params = tiny
  dec = dict(params['decoder'])
  for name in list(dec):
    if name in ('conv_norm_out', 'conv_out') or (
      name.startswith('up_blocks_') and int(name.split('_')[-1]) >= num_blocks
    ):
      del dec[name]
  pruned = {k: v for k, v in params.items() if k not in ('encoder', 'quant_conv')} | {'decoder': dec}
  z = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
  feats = jax.jit(lambda p, z: _features(model, p, z, num_blocks))(pruned, z)
  full = jax.jit(lambda p, z: _features(model, p, z, 4))(params, z)
  assert len(feats) == num_blocks + 1
  for f, g in zip(feats, full):
    np.testing.assert_array_equal(f, g)


def test_remat_matches_plain_values_and_gradients(tiny):
  model, params = tiny
  remat_model = ae.from_preset('tiny', remat=True)
  z = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))

  def loss(m):
    return lambda z: sum(jnp.mean(jnp.square(f)) for f in _features(m, params, z, 4))

  np.testing.assert_allclose(jax.jit(loss(remat_model))(z), jax.jit(loss(model))(z), rtol=1e-6)
  g_plain, g_remat = jax.jit(jax.grad(loss(model)))(z), jax.jit(jax.grad(loss(remat_model)))(z)
  np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-7 * float(jnp.max(jnp.abs(g_plain))))
  # The remat model really rematerialises: its backward pass holds checkpoint boundaries.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat_model)))(z))
  assert 'remat' in jaxpr or 'checkpoint' in jaxpr
  assert 'remat' not in str(jax.make_jaxpr(jax.grad(loss(model)))(z))


def test_bf16_compute(tiny):
  model, params = tiny
  bf16 = ae.from_preset('tiny', dtype=jnp.bfloat16)
  z = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  f32_feats = _features(model, params, z, 4)
  bf16_feats = jax.jit(lambda p, z: _features(bf16, p, z, 4))(params, z)
  chex.assert_trees_all_equal_shapes(f32_feats, bf16_feats)
  for f, g in zip(f32_feats, bf16_feats):
    assert g.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(f - g.astype(jnp.float32))) / jnp.max(jnp.abs(f)))
    assert err < 5e-2
  # Parameters stay float32 (master weights); decode returns float32.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert bf16.apply({'params': params}, z, method=bf16.decode).dtype == jnp.float32


def test_no_recompilation_across_calls(tiny):
  model, params = tiny

  @jax.jit
  @chex.assert_max_traces(n=1)
  def feats(p, z):
    return _features(model, p, z, 3)

  for seed in range(3):
    feats(params, jax.random.normal(jax.random.key(seed), (2, 4, 4, 4)))


def test_latent_scaling_round_trip():
  model = ae.from_preset('flux')
  z = jax.random.normal(jax.random.key(4), (1, 2, 2, 16))
  np.testing.assert_allclose(model.scale_latents(z), (z - 0.1159) * 0.3611, rtol=1e-6)
  np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, rtol=1e-5, atol=1e-6)


def test_posterior_sample_statistics():
  mean = jnp.full((4, 8, 8, 4), 0.5)
  logvar = jnp.full((4, 8, 8, 4), np.log(0.25))
  z = ae.sample_posterior(jax.random.key(5), mean, logvar)
  assert abs(float(z.mean()) - 0.5) < 0.05 and abs(float(z.std()) - 0.5) < 0.05
  kl = ae.kl_divergence(mean, logvar)
  expected = 0.5 * (0.25 + 0.25 - 1 - np.log(0.25)) * 8 * 8 * 4
  np.testing.assert_allclose(kl, np.full(4, expected), rtol=1e-5)


def test_wrong_latent_channels_raise_before_compiling(tiny):
  model, params = tiny
  z = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match='latents have 8 channels, the autoencoder expects 4'):
    jax.jit(lambda p, z: _features(model, p, z, 2))(params, z)
  with pytest.raises(ValueError, match='latents have 8 channels'):
    model.apply({'params': params}, z, method=model.decode)


def test_num_blocks_out_of_range(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match='decoder has 4 up blocks.*num_blocks=5'):
    _features(model, params, jnp.zeros((1, 4, 4, 4)), 5)


def test_bad_image_inputs(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match='not a multiple of the downsampling factor 8'):
    model.apply({'params': params}, jnp.zeros((1, 20, 20, 3)), method=model.encode)
  with pytest.raises(ValueError, match='images have 1 channels'):
    model.apply({'params': params}, jnp.zeros((1, 16, 16, 1)), method=model.encode)
  with pytest.raises(ValueError, match='only for AsymmetricAutoencoderKL'):
    model.apply(
      {'params': params},
      jnp.zeros((1, 2, 2, 4)),
      jnp.zeros((1, 16, 16, 3)),
      jnp.zeros((1, 16, 16, 1)),
      method=model.decode,
    )


def test_presets():
  assert set(ae.PRESETS) >= {'sd1', 'sdxl', 'sd3', 'flux', 'asymmetric_x1_5', 'tiny'}
  with pytest.raises(ValueError, match="unknown autoencoder preset 'sd5'"):
    ae.from_preset('sd5')
  with pytest.raises(ValueError, match='positive multiple of norm_num_groups'):
    ae.AutoencoderConfig(block_out_channels=(30, 64), decoder_block_out_channels=(30, 64))
  flat = flax.traverse_util.flatten_dict(
    jax.eval_shape(lambda: ae.init_params(ae.from_preset('sd3'), jax.random.key(0)))
  )
  assert not any('quant_conv' in k[0] for k in flat)
