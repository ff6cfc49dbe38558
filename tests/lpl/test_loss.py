"""The loss end to end: parity with independent PyTorch computations, gradients, NaN safety, config errors."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lpl_jax import autoencoder as ae
from lpl_jax import lpl
from tests.lpl import torch_lpl
from tests.tiny_autoencoder import tiny_autoencoder


@functools.cache
def _load(folder):
  return ae.from_diffusers(folder)


def latents(seed, shape=(2, 8, 8, 4), spike=True):
  """Scaled latents z0 and a noisy estimate z0_hat; a spike in z0 plants outlier patches in the deep features."""
  rng = np.random.default_rng(seed)
  z0 = rng.normal(size=shape).astype(np.float32)
  if spike:
    z0[0, 2, 5, :] = 6.0
  z0_hat = (z0 + 0.5 * rng.normal(size=shape)).astype(np.float32)
  return z0_hat, z0


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def jax_loss(model, params, cfg):
  return jax.jit(lambda p, zh, z: lpl.lpl_loss(lpl.make_features_fn(model, p, cfg), zh, z, cfg))


@pytest.mark.parametrize('norm', ['shared', 'default'])
def test_reference_preset_matches_pytorch(diffusers_folder, norm):
  """The `reference` preset equals an independent PyTorch computation (tests/lpl/torch_lpl.py) on diffusers' decoder
  with the same weights: loss and gradient w.r.t. z0_hat."""
  folder, vae = diffusers_folder('tiny')
  model, params = _load(folder)
  cfg = lpl.LPLConfig.from_preset('reference', normalization=norm)
  z0_hat, z0 = latents(0)
  loss, aux = jax_loss(model, params, cfg)(params, z0_hat, z0)
  assert float(jnp.max(aux['outlier_fraction'])) > 0, 'the planted spike must produce masked positions'
  zh = nchw(z0_hat).requires_grad_(True)
  expected = torch_lpl.reference_lpl(vae, zh, nchw(z0), norm=norm)
  assert rel(loss, expected.detach()) <= 1e-5
  expected.sum().backward()
  grad = jax.jit(jax.grad(lambda zh: jnp.sum(lpl.lpl_loss(lpl.make_features_fn(model, params, cfg), zh, z0, cfg)[0])))(
    z0_hat
  )
  assert rel(np.transpose(grad, (0, 3, 1, 2)), zh.grad) <= 1e-4


@pytest.mark.parametrize('axis', ['space', 'channels'])
@pytest.mark.parametrize('stats_gradient', [False, True])
def test_paper_preset_matches_pytorch(diffusers_folder, axis, stats_gradient):
  """Both readings of the standardisation's axis, with and without a gradient through the prediction's statistics,
  equal the PyTorch transcription (tests/lpl/torch_lpl.py): loss and gradient w.r.t. z0_hat."""
  folder, vae = diffusers_folder('tiny')
  model, params = _load(folder)
  cfg = lpl.LPLConfig.from_preset('paper', norm_axis=axis, stats_gradient=stats_gradient)
  z0_hat, z0 = latents(1)
  loss, aux = jax_loss(model, params, cfg)(params, z0_hat, z0)
  zh = nchw(z0_hat).requires_grad_(True)
  expected = torch_lpl.paper_lpl(vae, zh, nchw(z0), axis=axis, stats_gradient=stats_gradient)
  assert rel(loss, expected.detach()) <= 1e-5
  np.testing.assert_allclose(aux['layer_weights'], [1, 0.5, 0.25, 0.125, 0.125])
  expected.sum().backward()
  grad = jax.jit(jax.grad(lambda zh: jnp.sum(lpl.lpl_loss(lpl.make_features_fn(model, params, cfg), zh, z0, cfg)[0])))(
    z0_hat
  )
  assert rel(np.transpose(grad, (0, 3, 1, 2)), zh.grad) <= 1e-4


@pytest.fixture(scope='module')
def tiny():
  return tiny_autoencoder()


@pytest.mark.parametrize('preset', ['paper', 'reference'])
def test_zero_at_target_and_no_gradient_into_z0(tiny, preset):
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset(preset)
  _, z0 = latents(2)
  loss, _ = jax_loss(model, params, cfg)(params, z0, z0)
  # The two branches are compiled separately (one under stop_gradient, one rematerialised), so "zero" is up to
  # float32 rounding of the features, far below any loss value the tests see (~1e-2).
  np.testing.assert_allclose(loss, np.zeros(2), atol=1e-12)

  def total(zh, z):
    return jnp.sum(lpl.lpl_loss(lpl.make_features_fn(model, params, cfg), zh, z, cfg)[0])

  g_hat, g_z0 = jax.jit(jax.grad(total, argnums=(0, 1)))(z0, z0)
  np.testing.assert_array_equal(g_z0, np.zeros_like(z0))
  np.testing.assert_allclose(g_hat, np.zeros_like(z0), atol=1e-6)


def _count_convs(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'conv_general_dilated'
    for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, 'jaxprs_in_params') else []:
      n += _count_convs(sub)
    for v in eqn.params.values():
      if hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
        n += _count_convs(v.jaxpr)
      elif hasattr(v, 'eqns'):
        n += _count_convs(v)
  return n


def test_no_gradient_is_computed_for_decoder_params(tiny):
  """The backward pass holds only input-gradient convolutions: per decoder conv, one in each forward branch and one
  transposed for d/dz0_hat, and none for the kernels (which would add a fourth)."""
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset('paper', remat=False)
  z0_hat, z0 = latents(3)
  fwd = jax.make_jaxpr(lambda zh: model.apply({'params': params}, zh, 4, method=model.decoder_features))(z0_hat)
  per_branch = _count_convs(fwd.jaxpr)
  grad = jax.make_jaxpr(
    jax.grad(lambda zh: jnp.sum(lpl.lpl_loss(lpl.make_features_fn(model, params, cfg), zh, z0, cfg)[0]))
  )(z0_hat)
  assert _count_convs(grad.jaxpr) == 3 * per_branch
  # And taking the gradient w.r.t. the autoencoder params gives exact zeros (stop_gradient).
  g = jax.grad(lambda p: jnp.sum(lpl.lpl_loss(lpl.make_features_fn(model, p, cfg), z0_hat, z0, cfg)[0]))(params)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


@pytest.mark.slow
def test_gradient_matches_float64_finite_differences(tiny):
  from jax.test_util import check_grads

  model, params = tiny
  with jax.enable_x64(True):
    model64 = ae.from_preset('tiny', dtype=jnp.float64, param_dtype=jnp.float64)
    params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    z0_hat, z0 = (jnp.asarray(x, jnp.float64) for x in latents(4, shape=(1, 4, 4, 4), spike=False))
    # The gradient of the loss as a function: the paper's standardisation with its statistics differentiated (with
    # stats_gradient=False they are constants of the backward pass by design; the PyTorch test checks that one).
    for preset, overrides in (('paper', dict(stats_gradient=True)), ('reference', {})):
      cfg = lpl.LPLConfig.from_preset(preset, **overrides)
      fn = lpl.make_features_fn(model64, params64, cfg)
      check_grads(
        lambda zh, cfg=cfg, fn=fn: lpl.lpl_loss(fn, zh, z0, cfg)[0],
        (z0_hat,),
        order=1,
        modes=['rev'],
        eps=1e-4,
        atol=1e-6,
        rtol=1e-4,
      )


def test_only_the_deepest_used_block_runs(tiny):
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset('paper', layers=(0, 1), outlier_layers=())
  dec = {k: v for k, v in params['decoder'].items() if k not in ('up_blocks_1', 'up_blocks_2', 'up_blocks_3')}
  pruned = dict(params, decoder=dec)
  z0_hat, z0 = latents(5)
  loss_pruned, _ = jax_loss(model, pruned, cfg)(pruned, z0_hat, z0)
  loss_full, _ = jax_loss(model, params, cfg)(params, z0_hat, z0)
  np.testing.assert_array_equal(loss_pruned, loss_full)


def test_remat_prediction_branch_is_exact(tiny):
  model, params = tiny
  z0_hat, z0 = latents(6)
  out = {}
  for remat in (False, True):
    cfg = lpl.LPLConfig.from_preset('paper', remat=remat)
    f = lambda zh, cfg=cfg: jnp.sum(lpl.lpl_loss(lpl.make_features_fn(model, params, cfg), zh, z0, cfg)[0])
    out[remat] = jax.jit(jax.value_and_grad(f))(z0_hat)
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(out[False][1]))))


def test_no_recompilation_across_values(tiny):
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset('paper')

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, zh, z):
    return lpl.lpl_loss(lpl.make_features_fn(model, p, cfg), zh, z, cfg)

  for seed in range(3):
    step(params, *latents(10 + seed))


def test_bf16_within_tolerance(tiny):
  """bf16 compute of the decoder (float32 loss): within 1% of the float32 loss (docs/lpl.md)."""
  model, params = tiny
  bf16 = ae.from_preset('tiny', dtype=jnp.bfloat16)
  cfg = lpl.LPLConfig.from_preset('paper')
  z0_hat, z0 = latents(7)
  f32, _ = jax_loss(model, params, cfg)(params, z0_hat, z0)
  b16, _ = jax_loss(bf16, params, cfg)(params, z0_hat, z0)
  assert b16.dtype == jnp.float32
  np.testing.assert_allclose(b16, f32, rtol=1e-2)


@pytest.mark.parametrize('normalization', ['paper', 'shared', 'default', 'none'])
def test_all_masked_and_constant_maps_are_finite(tiny, normalization):
  """An all-masked map contributes 0 (its masked mean divides by max(count, 1)); a constant map standardises to 0;
  gradients stay finite."""
  model, params = tiny
  const = lpl.FeaturesFn(model, params)
  const_fn = dataclasses.replace(const)

  def features(z, n):
    feats = const_fn(z, n)
    return [jnp.zeros_like(f) + jnp.mean(z) * 0 + 1.0 if i == 3 else f for i, f in enumerate(feats)]

  features.downsample_factor = 8
  cfg = lpl.LPLConfig.from_preset('reference', normalization=normalization)
  z0_hat, z0 = latents(8)

  def summed(zh):  # one compilation for the values and the gradient
    loss, aux = lpl.lpl_loss(features, zh, z0, cfg)
    return jnp.sum(loss), (loss, aux)

  (_, (loss, aux)), grad = jax.jit(jax.value_and_grad(summed, has_aux=True))(z0_hat)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  # Algorithm 1 masks a constant map entirely (q_low == q_high, margin 0, strict comparisons).
  np.testing.assert_array_equal(aux['outlier_fraction'][:, 3], [1.0, 1.0])
  np.testing.assert_array_equal(aux['layer_loss'][:, 3], [0.0, 0.0])
  pred = jnp.ones((2, 4, 4, 3))
  p, t = lpl.normalize(normalization, pred, pred, jnp.zeros((2, 4, 4, 3), bool))
  d = lpl.masked_distance(p, t, jnp.zeros((2, 4, 4, 3), bool))
  assert np.all(np.isfinite(p)) and np.all(np.isfinite(d))


def test_image_space_variant(tiny):
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset('paper', space='image')
  z0_hat, z0 = latents(9)
  loss, _ = jax_loss(model, params, cfg)(params, z0_hat, z0)
  decode = lambda z: model.apply({'params': params}, model.unscale_latents(z), method=model.decode)
  expected = np.mean((np.asarray(decode(z0_hat)) - np.asarray(decode(z0))) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_gates():
  from diffusers import DDPMScheduler

  alphas_cumprod = (
    DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
    .alphas_cumprod.numpy()
    .astype(np.float64)
  )
  alpha, sigma = np.sqrt(alphas_cumprod), np.sqrt(1 - alphas_cumprod)
  kept = lpl.noise_level_gate(jnp.asarray(alpha), jnp.asarray(sigma), tau=5.0, resolution=256)
  np.testing.assert_array_equal(kept, (sigma / alpha <= 5.0).astype(np.float32))
  assert abs(float(kept.mean()) - 0.8) < 0.01  # docs/lpl.md: tau = 5 keeps about 80% of uniform timesteps
  at_512 = lpl.noise_level_gate(jnp.asarray(alpha), jnp.asarray(sigma), tau=5.0, resolution=512)
  np.testing.assert_array_equal(at_512, (sigma / alpha <= 10.0).astype(np.float32))
  np.testing.assert_array_equal(lpl.timestep_gate(jnp.arange(400), threshold=200), np.arange(400) < 200)
  # Flow matching at t = 1 (alpha = 0) is never gated in, without a division by zero.
  assert float(lpl.noise_level_gate(jnp.zeros(1), jnp.ones(1), tau=5.0, resolution=256)[0]) == 0.0
  cfg = lpl.LPLConfig.from_preset('reference')
  np.testing.assert_array_equal(lpl.gate_weights(cfg, resolution=256, t=jnp.array([10, 300])), [1.0, 0.0])
  assert lpl.noise_level_threshold(lpl.LPLConfig.from_preset('paper'), 512) == 10.0


def test_sample_weights_scale_each_row(tiny):
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset('paper')
  z0_hat, z0 = latents(11)
  fn = lpl.make_features_fn(model, params, cfg)
  base, _ = lpl.lpl_loss(fn, z0_hat, z0, cfg)
  weighted, _ = lpl.lpl_loss(fn, z0_hat, z0, cfg, sample_weights=jnp.array([0.0, 2.0]))
  np.testing.assert_allclose(weighted, base * jnp.array([0.0, 2.0]), rtol=1e-6)


def test_config_errors(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match="unknown LPL preset 'papper'"):
    lpl.LPLConfig.from_preset('papper')
  with pytest.raises(ValueError, match=r"no field\(s\) \['quantile'\]"):
    lpl.LPLConfig.from_preset('paper', quantile=0.1)
  with pytest.raises(ValueError, match=r'quant must be in \[0, 0.5\), got -0.1'):
    lpl.LPLConfig.from_preset('paper', quant=-0.1)
  with pytest.raises(ValueError, match='kernel sizes must be >= 1'):
    lpl.LPLConfig.from_preset('paper', opening=0)
  with pytest.raises(ValueError, match="normalization='batch'"):
    lpl.LPLConfig.from_preset('reference', normalization='batch')
  with pytest.raises(ValueError, match='layers contains \\[5\\]'):
    lpl.LPLConfig.from_preset('paper', layers=(0, 5))
  with pytest.raises(ValueError, match='layer_weights has 2 entries for 5 used taps'):
    lpl.LPLConfig.from_preset('paper', layer_weights=(1.0, 0.5))
  with pytest.raises(ValueError, match='decoder has 4 up blocks, LPLConfig.num_blocks asks for 5'):
    lpl.make_features_fn(model, params, lpl.LPLConfig.from_preset('paper', num_blocks=5, layers=(0, 1)))


def test_layer_masks_grow_each_taps_kernels_with_the_image():
  """A half-resolution tap at twice the base resolution gets Algorithm 1's (3, 1) at the base, doubled: (7, 3)."""
  cfg = lpl.LPLConfig.from_preset('paper', num_blocks=0, outlier_layers=(0,), base_resolution=32)
  f = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)).at[:, 10:13, 20:23, :].set(50.0)  # a 3x3 outlier
  (mask,) = lpl.layer_masks([f], cfg, image_size=64)
  expected = lpl.outlier_mask(f, down_factor=1, opening=7, closing=3)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(expected))
  assert not np.asarray(expected).all()
  (at_base,) = lpl.layer_masks([f], cfg, image_size=32)  # at the base, on a map at down factor 1: (5, 3)
  np.testing.assert_array_equal(np.asarray(at_base), np.asarray(lpl.outlier_mask(f, opening=5, closing=3)))
