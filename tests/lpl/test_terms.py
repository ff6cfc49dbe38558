"""The paper's standardisation under both readings of its axis and of its gradient, and the std ratio the step logs,
against NumPy and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import lpl
from lpl_jax.lpl import terms
from tests.tiny_autoencoder import tiny_autoencoder

EPS = terms.STANDARDIZE_EPS


def _maps(seed, shape=(2, 6, 5, 4), masked=True):
  rng = np.random.default_rng(seed)
  pred = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.5, 3, size=shape[-1]).astype(np.float32)
  target = pred + rng.normal(size=shape).astype(np.float32) * 0.5
  mask = rng.uniform(size=shape) > 0.3 if masked else None
  return pred, target, mask


def _numpy_standardize(pred, target, mask, axis):
  reduce = (1, 2) if axis == 'space' else (3,)
  w = np.ones_like(pred) if mask is None else mask.astype(np.float64)
  n = np.maximum(w.sum(axis=reduce, keepdims=True), 1)
  mean = (pred * w).sum(axis=reduce, keepdims=True) / n
  var = ((pred - mean) ** 2 * w).sum(axis=reduce, keepdims=True) / n
  std = np.sqrt(var + EPS)
  return (pred - mean) / std, (target - mean) / std


@pytest.mark.parametrize('axis', ['space', 'channels'])
@pytest.mark.parametrize('masked', [False, True])
def test_standardize_matches_numpy_on_both_axes(axis, masked):
  pred, target, mask = _maps(0, masked=masked)
  p, t = terms.standardize_shared(pred, target, mask, axis=axis)
  p_np, t_np = _numpy_standardize(pred.astype(np.float64), target.astype(np.float64), mask, axis)
  np.testing.assert_allclose(p, p_np, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(t, t_np, rtol=1e-4, atol=1e-5)
  # The prediction is standardised along the chosen axis: zero mean and unit variance over its unmasked entries.
  reduce = (1, 2) if axis == 'space' else (3,)
  w = np.ones_like(pred) if mask is None else mask.astype(np.float64)
  n = w.sum(axis=reduce, keepdims=True)
  keep = n[..., 0] > 1 if axis == 'channels' else n > 1  # entries with at least two unmasked values
  mean = (np.asarray(p) * w).sum(axis=reduce, keepdims=True) / n
  var = ((np.asarray(p) - mean) ** 2 * w).sum(axis=reduce, keepdims=True) / n
  np.testing.assert_allclose(mean, 0, atol=1e-5)
  np.testing.assert_allclose(var[keep] if axis == 'space' else var[..., 0][keep], 1, rtol=1e-3)


def test_the_two_axes_differ():
  pred, target, mask = _maps(1)
  a = terms.masked_distance(*terms.standardize_shared(pred, target, mask, axis='space'), mask)
  b = terms.masked_distance(*terms.standardize_shared(pred, target, mask, axis='channels'), mask)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-2 * float(jnp.max(a))


def _loss(stats_gradient, axis='space'):
  def f(pred, target):
    p, t = terms.standardize_shared(pred, target, None, axis=axis, stats_gradient=stats_gradient)
    return jnp.sum(terms.masked_distance(p, t))

  return f


def test_without_stats_gradient_the_gradient_is_the_distance_scaled_by_fixed_statistics():
  """Closed form, per channel over space: d/dp [mean_c mean_hw ((p - t) / s_c)^2] = 2 (p - t) / (C H W s_c^2), with
  s_c^2 the prediction channel's variance (+eps), a constant."""
  pred, target, _ = _maps(2, masked=False)
  b, h, w, c = pred.shape
  grad = jax.grad(_loss(False))(pred, target)
  var = pred.astype(np.float64).var(axis=(1, 2), keepdims=True) + EPS
  np.testing.assert_allclose(grad, 2 * (pred - target) / (c * h * w * var), rtol=1e-4, atol=1e-7)
  # With the statistics differentiated it is another vector field (same loss values).
  other = jax.grad(_loss(True))(pred, target)
  assert float(jnp.max(jnp.abs(other - grad))) > 0.1 * float(jnp.max(jnp.abs(grad)))
  np.testing.assert_allclose(_loss(True)(pred, target), _loss(False)(pred, target), rtol=1e-6)


def test_with_stats_gradient_added_noise_is_barely_pushed_back():
  """pred = target + a * noise: the loss is |a n|^2 / (s_t^2 + a^2 s_n^2), which saturates as a grows when the
  statistics are differentiated; the gradient along the noise then nearly vanishes, so the prediction's feature
  variance can grow almost for free. With fixed statistics the push back stays."""
  rng = np.random.default_rng(3)
  target = rng.normal(size=(1, 16, 16, 4)).astype(np.float32)
  noise = rng.normal(size=target.shape).astype(np.float32)
  pred = target + 10.0 * noise
  along = lambda g: float(jnp.sum(g * noise))
  fixed = along(jax.grad(_loss(False))(pred, target))
  free = along(jax.grad(_loss(True))(pred, target))
  assert fixed > 0 and abs(free) < 0.02 * fixed


@pytest.mark.parametrize('masked', [False, True])
def test_std_ratio_matches_numpy(masked):
  pred, target, mask = _maps(4, masked=masked)
  w = np.ones_like(pred) if mask is None else mask.astype(np.float64)
  n = w.sum(axis=(1, 2), keepdims=True)

  def std(x):
    mean = (x * w).sum(axis=(1, 2), keepdims=True) / n
    return np.sqrt(((x - mean) ** 2 * w).sum(axis=(1, 2)) / n[:, 0, 0])

  expected = (std(pred.astype(np.float64)) / std(target.astype(np.float64))).mean(axis=-1)
  np.testing.assert_allclose(terms.std_ratio(pred, target, mask), expected, rtol=1e-5)
  np.testing.assert_allclose(terms.std_ratio(2 * target, target, mask), 2.0, rtol=1e-5)


def test_config_names_a_bad_axis():
  with pytest.raises(ValueError, match='norm_axis'):
    lpl.LPLConfig.from_preset('paper', norm_axis='position')


@pytest.mark.slow
def test_fitting_a_scale_under_an_irreducible_error():
  """z0_hat = a * (z0 + 0.5 n) with n fixed noise the model cannot remove; a is fitted by gradient descent on the
  paper preset's LPL through the tiny decoder. Held fixed, the statistics let LPL shrink the estimate as a squared
  error does (a < 1, the predicted features vary less than the target's); differentiated, they inflate it (a > 1,
  std ratio > 1 at every tap)."""

  model, params = tiny_autoencoder()
  z0 = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
  noisy = z0 + 0.5 * jax.random.normal(jax.random.key(2), z0.shape)
  fitted = {}
  for stats_gradient in (False, True):
    cfg = lpl.LPLConfig.from_preset('paper', stats_gradient=stats_gradient)
    features_fn = lpl.make_features_fn(model, params, cfg)

    def loss(a, cfg=cfg, features_fn=features_fn):
      value, aux = lpl.lpl_loss(features_fn, a * noisy, z0, cfg)
      return jnp.mean(value), aux['std_ratio']

    step = jax.jit(
      lambda a, loss=loss: (lambda r: (a - 0.12 * r[1], r[0][1]))(jax.value_and_grad(loss, has_aux=True)(a))
    )
    a = jnp.float32(1.0)
    for _ in range(60):
      a, ratio = step(a)
    fitted[stats_gradient] = float(a), np.asarray(jnp.mean(ratio, 0))
  (a_fixed, r_fixed), (a_free, r_free) = fitted[False], fitted[True]
  assert a_fixed < 0.9 and np.all(r_fixed < 1)
  assert a_free > 1.02 and np.all(r_free > 1)
