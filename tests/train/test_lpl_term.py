"""The step's LPL term (stratified rows, chunks, a gradient computed in the forward pass) against plain autodiff of
`lpl_loss` on the same rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import diffusion, lpl, train
from tests.tiny_autoencoder import tiny_autoencoder

# Compiles the tiny decoder's forward and backward four times (~1.5 min on 2 busy cores): left to CI.
pytestmark = pytest.mark.slow

GROUPS, GROUP, K = 2, 4, 2  # 8 rows: rows 0, 1 and 4, 5 get LPL


@pytest.fixture(scope='module')
def setup():
  model, params = tiny_autoencoder(seed=9)
  lcfg = lpl.LPLConfig.from_preset('paper', tau=20.0, remat=False)
  z0 = jax.random.normal(jax.random.key(1), (GROUPS * GROUP, 4, 4, 4))
  z0_hat = z0 + 0.3 * jax.random.normal(jax.random.key(2), z0.shape)
  return model, params, lcfg, z0, z0_hat


def _cfg(lcfg, chunk):
  return train.StepConfig(
    diffusion.get_formulation('ddpm_eps'),
    diffusion.TimestepSampler(num_timesteps=1000),
    train.OptimConfig(),
    lpl=lcfg,
    lpl_rows_per_group=K,
    lpl_groups=GROUPS,
    lpl_chunk=chunk,
  )


@pytest.mark.parametrize('chunk', [0, 1])
def test_lpl_term_value_and_gradient_equal_autodiff_of_the_loss(setup, chunk):
  model, params, lcfg, z0, z0_hat = setup
  cfg = _cfg(lcfg, chunk)
  weights = jnp.arange(1.0, 1.0 + z0.size).reshape(z0.shape) / z0.size  # a non-trivial cotangent path

  def ours(zh):
    loss, sq, per_layer = train.lpl_term(zh, z0, params, ae_model=model, cfg=cfg, mesh=None, groups=GROUPS)
    return loss * 2.5 + jnp.sum(zh * weights), (sq, per_layer)

  rows = np.array([0, 1, 4, 5])
  features_fn = lpl.make_features_fn(model, params, lcfg)

  def reference(zh):
    loss, aux = lpl.lpl_loss(features_fn, zh[rows], z0[rows], lcfg)
    return jnp.sum(loss) * 2.5 + jnp.sum(zh * weights), (
      jnp.sum(jnp.square(loss)),
      [jnp.sum(aux[k], 0) for k in ('layer_loss', 'outlier_fraction', 'std_ratio')],
    )

  (v, (sq, (layer, frac, ratio))), g = jax.jit(jax.value_and_grad(ours, has_aux=True))(z0_hat)
  (v_ref, (sq_ref, (layer_ref, frac_ref, ratio_ref))), g_ref = jax.jit(jax.value_and_grad(reference, has_aux=True))(
    z0_hat
  )
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  np.testing.assert_allclose(sq, sq_ref, rtol=1e-5)
  np.testing.assert_allclose(layer, layer_ref, rtol=1e-5)
  np.testing.assert_allclose(frac, frac_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ratio, ratio_ref, rtol=1e-5)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(g_ref))))
  lpl_part = np.asarray(g - weights)
  assert np.all(lpl_part[[2, 3, 6, 7]] == 0) and np.all(np.abs(lpl_part[rows]).sum(axis=(1, 2, 3)) > 0)


def test_backward_reruns_no_decoder_forward(setup):
  """The term's gradient costs what plain autodiff of the loss on the K rows costs: the backward pass reruns neither
  decoder branch (a `jax.checkpoint` around the chunk would add a second forward of both)."""
  model, params, lcfg, z0, z0_hat = setup
  cfg = _cfg(lcfg, 0)
  rows = np.array([0, 1, 4, 5])
  features_fn = lpl.make_features_fn(model, params, lcfg)

  def term(zh):
    return train.lpl_term(zh, z0, params, ae_model=model, cfg=cfg, mesh=None, groups=GROUPS)[0]

  def reference(zh):
    return jnp.sum(lpl.lpl_loss(features_fn, zh[rows], z0[rows], lcfg)[0])

  flops = lambda f: jax.jit(jax.grad(f)).lower(z0_hat).compile().cost_analysis()['flops']
  assert flops(term) <= 1.02 * flops(reference)


def test_probe_gives_the_values_with_no_gradient_and_no_backward(setup):
  """Eq. 15's baseline measures the LPL without training on it: the same sums, a zero gradient, and only the two
  forward passes compiled (no decoder backward)."""
  model, params, lcfg, z0, z0_hat = setup
  cfg = _cfg(lcfg, 0)

  def term(zh, probe):
    return train.lpl_term(zh, z0, params, ae_model=model, cfg=cfg, mesh=None, groups=GROUPS, probe=probe)

  trained, probed = (jax.jit(lambda zh, p=p: term(zh, p))(z0_hat) for p in (False, True))
  for a, b in zip(trained, probed, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda zh: term(zh, True)[0]))(z0_hat)
  assert float(jnp.max(jnp.abs(grad))) == 0.0
  # As the step uses it: the value and the gradient of the term.
  flops = lambda p: jax.jit(jax.value_and_grad(lambda zh: term(zh, p)[0])).lower(z0_hat).compile().cost_analysis()
  assert flops(True)['flops'] < 0.7 * flops(False)['flops']
