"""Loss terms of the autoencoder recipe against NumPy, scikit-image and a PyTorch transcription of taming's code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from lpl_jax.autoencoder import AutoencoderKL, kl_divergence
from lpl_jax.train.autoencoder import AETrainConfig, losses
from lpl_jax.train.autoencoder import step as step_lib
from lpl_jax.train.autoencoder.discriminator import PatchDiscriminator


def _images(seed, shape=(3, 24, 24, 3)):
  rng = np.random.default_rng(seed)
  x = np.clip(rng.normal(0, 0.5, shape), -1, 1).astype(np.float32)
  return x, np.clip(x + rng.normal(0, 0.2, shape), -1, 1).astype(np.float32)


def test_kl_of_known_gaussians():
  rng = np.random.default_rng(0)
  mean, std = rng.normal(size=(2, 2, 2, 3)), rng.uniform(0.2, 2.0, size=(2, 2, 2, 3))
  # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 per element.
  expected = np.sum(-np.log(std) + 0.5 * (std**2 + mean**2) - 0.5, axis=(1, 2, 3))
  got = jax.jit(kl_divergence)(jnp.asarray(mean, jnp.float32), jnp.asarray(2 * np.log(std), jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert float(kl_divergence(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))[0]) == 0.0


def test_reconstruction_losses_sum_per_example():
  x, y = _images(1)
  np.testing.assert_allclose(jax.jit(losses.l1_reconstruction)(x, y), np.abs(x - y).sum((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(losses.l2_reconstruction)(x, y), ((x - y) ** 2).sum((1, 2, 3)), rtol=1e-5)
  with pytest.raises(AssertionError):
    losses.l1_reconstruction(x, y[:, :8])


def _skimage_ssim(x, y):
  return np.array(
    [
      structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0, channel_axis=-1
      )
      for a, b in zip(x, y, strict=True)
    ]
  )


def test_ssim_matches_scikit_image():
  x, y = _images(2)
  np.testing.assert_allclose(jax.jit(losses.ssim)(x, y), _skimage_ssim(x, y), atol=1e-5)
  np.testing.assert_allclose(losses.ssim(x, x), 1.0, atol=1e-6)


def test_multiscale_ssim_loss_is_the_mean_over_the_pyramid():
  x, y = _images(3, (2, 32, 32, 3))
  pool = lambda a: a.reshape(2, 16, 2, 16, 2, 3).mean((2, 4))
  expected = 0.5 * ((1 - _skimage_ssim(x, y)) + (1 - _skimage_ssim(pool(x), pool(y))))  # 8 px < window: 2 scales
  np.testing.assert_allclose(jax.jit(losses.ssim_loss)(x, y), expected, atol=1e-5)
  with pytest.raises(ValueError, match='smaller than'):
    losses.ssim_loss(x[:, :8, :8], y[:, :8, :8])


def test_ssim_loss_gradient():
  x, y = _images(4, (1, 12, 12, 1))
  with jax.enable_x64(True):
    f = lambda a: jnp.sum(losses.ssim_loss(jnp.asarray(x, jnp.float64), a))
    chex.assert_numerical_grads(f, (jnp.asarray(y, jnp.float64),), order=1, atol=1e-4, rtol=1e-3)


def test_hinge_losses():
  rng = np.random.default_rng(5)
  real, fake = rng.normal(size=(4, 3, 3, 1)).astype(np.float32), rng.normal(size=(4, 3, 3, 1)).astype(np.float32)
  expected = 0.5 * (np.maximum(1 - real, 0).mean((1, 2, 3)) + np.maximum(1 + fake, 0).mean((1, 2, 3)))
  np.testing.assert_allclose(jax.jit(losses.hinge_discriminator_loss)(real, fake), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.generator_loss)(fake), -fake.mean((1, 2, 3)), rtol=1e-6)
  # A discriminator that is right by a margin of 1 has no loss.
  assert float(losses.hinge_discriminator_loss(np.full((1, 2), 1.5), np.full((1, 2), -1.5))[0]) == 0.0


def test_adaptive_weight_matches_taming_on_a_toy_network():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(6)
  h, target = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
  w, d = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)

  # taming's LPIPSWithDiscriminator.calculate_adaptive_weight, transcribed to a linear "decoder" rec = h @ W.
  wt = torch.tensor(w, requires_grad=True)
  rec = torch.tensor(h) @ wt
  nll, g = (rec - torch.tensor(target)).abs().sum(1).mean(), -(rec @ torch.tensor(d)).mean()
  nll_grads = torch.autograd.grad(nll, wt, retain_graph=True)[0]
  g_grads = torch.autograd.grad(g, wt, retain_graph=True)[0]
  expected = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).item() * 0.5

  nll_j = jax.grad(lambda k: jnp.mean(jnp.sum(jnp.abs(h @ k - target), 1)))(w)
  g_j = jax.grad(lambda k: -jnp.mean((h @ k) @ d))(w)
  got = jax.jit(lambda a, b: losses.adaptive_weight(a, b, disc_weight=0.5))(nll_j, g_j)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Clipped at max_weight when the GAN gradient vanishes; never differentiated.
  assert float(losses.adaptive_weight(nll_j, 0 * g_j, disc_weight=1.0)) == 1e4
  assert float(jax.grad(lambda a: losses.adaptive_weight(a, g_j, disc_weight=1.0))(nll_j).sum()) == 0.0


SMALL = dict(widths=(8, 16), layers_per_block=1, resolution=16)


@pytest.fixture(scope='module')
def small_model():
  cfg = AETrainConfig(**SMALL, disc_weight=0.5, perceptual_weight=0.1, disc_width=8, disc_layers=1)
  model, disc = step_lib.make_models(cfg)
  state = step_lib.create_state(cfg, model, disc, step_lib.make_optimizer(cfg))
  x = jnp.asarray(_images(7, (2, 16, 16, 3))[0])
  return cfg, model, disc, state.params, state.disc_params, x


@pytest.mark.slow
def test_reconstruct_equals_decode_of_the_encoding(small_model):
  _, model, _, params, _, x = small_model
  got, _, mean, _ = jax.jit(lambda p, x: step_lib.reconstruct(model, p, x))(params, x)
  expected = jax.jit(lambda p, m: model.apply({'params': p}, m, method=model.decode))(params, mean)
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_last_layer_grads_equal_the_full_gradient_restricted_to_conv_out(small_model):
  cfg, model, disc, params, disc_params, x = small_model
  lcfg = step_lib.loss_config(cfg)
  x_rec, h, _, _ = step_lib.reconstruct(model, params, x)
  nll_grad, gan_grad = jax.jit(lambda p, h: step_lib.last_layer_grads(model, p, h, x, disc, disc_params, lcfg))(
    params, h
  )

  def full(p, term):
    rec = step_lib.reconstruct(model, p, x)[0]
    if term == 'nll':
      return jnp.mean(step_lib._nll(x, rec, lcfg)[0])
    return jnp.mean(losses.generator_loss(disc.apply({'params': disc_params}, rec)))

  for term, got in (('nll', nll_grad), ('gan', gan_grad)):
    expected = jax.grad(full)(params, term)['decoder']['conv_out']['kernel']
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


def test_patch_discriminator_shapes():
  x = jnp.zeros((2, 32, 32, 3))
  for layers, side in ((2, 6), (3, 2)):
    disc = PatchDiscriminator(width=8, num_layers=layers)
    out = jax.eval_shape(lambda x, disc=disc: disc.apply(disc.init(jax.random.key(0), x), x), x)
    assert out.shape == (2, side, side, 1)


def test_config_checks_and_hash():
  with pytest.raises(ValueError, match='not a multiple'):
    AETrainConfig(resolution=20)
  with pytest.raises(ValueError, match='rec_loss'):
    AETrainConfig(rec_loss='l3')
  with pytest.raises(ValueError, match='preset'):
    AETrainConfig(preset='huge')
  f4 = AETrainConfig(widths=(32, 64, 128))
  assert f4.autoencoder_config().downsample_factor == 4
  assert isinstance(AutoencoderKL(f4.autoencoder_config()).config.block_out_channels, tuple)
  base = AETrainConfig()
  assert base.settings_hash() == AETrainConfig(log_every=7, checkpoint_every=3).settings_hash()
  assert base.settings_hash() != AETrainConfig(kl_weight=1e-5).settings_hash()
  assert base.settings_hash() != AETrainConfig(seed=1).settings_hash()
