"""Outlier masks (Algorithm 1 of Berrada et al., ICLR 2025) against a line-by-line PyTorch transcription."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lpl_jax.lpl.outliers import kth_smallest_pair, morphology_kernels, outlier_mask, quantile_ranks

_STATIC = ('quant', 'down_factor', 'opening', 'closing', 'margin_std', 'approx', 'recall_target')
mask_fn = jax.jit(outlier_mask, static_argnames=_STATIC)
kth_fn = jax.jit(kth_smallest_pair, static_argnums=(1, 2), static_argnames=('approx', 'recall_target'))


# --- Algorithm 1, transcribed from the paper (appendix A.3); only the literal 2 of `m` became `margin_std`. ---


def torch_kernels(opening, closing, down_f):
  opening = int(math.ceil(opening / down_f))
  closing = int(math.ceil(closing / down_f))
  if opening == 2:
    opening = 3
  if closing == 2:
    closing = 1
  return opening, closing


def remove_outliers(features, down_f=1, opening=5, closing=3, quant=0.02, margin_std=2.0):
  """Algorithm 1 on NCHW `features`; returns `(mask, features * mask)`."""
  opening, closing = torch_kernels(opening, closing, down_f)
  feat_flat = features.flatten(-2, -1)
  k1 = int(feat_flat.shape[-1] * quant)
  k2 = int(feat_flat.shape[-1] * (1 - quant))
  q1 = feat_flat.kthvalue(k1, dim=-1).values[..., None, None]
  q2 = feat_flat.kthvalue(k2, dim=-1).values[..., None, None]
  m = margin_std * feat_flat.std(-1)[..., None, None].detach()
  mask = (q1 - m < features) * (features < q2 + m)
  mask = torch.nn.MaxPool2d(kernel_size=closing, stride=1, padding=(closing - 1) // 2)(mask.float())  # closing
  mask = (-torch.nn.MaxPool2d(kernel_size=opening, stride=1, padding=(opening - 1) // 2)(-mask)).bool()  # opening
  return mask, features * mask


def reference_mask(feat_nhwc, **kwargs):
  """Algorithm 1's mask of an NHWC array, back in NHWC."""
  nchw = torch.from_numpy(np.ascontiguousarray(np.asarray(feat_nhwc, np.float32).transpose(0, 3, 1, 2)))
  mask, _ = remove_outliers(nchw, **kwargs)
  return mask.numpy().transpose(0, 2, 3, 1)


def jax_mask(feat_nhwc, *, quant, down_f, margin_std=2.0, opening=5, closing=3):
  mask = mask_fn(
    jnp.asarray(feat_nhwc), quant=quant, down_factor=down_f, opening=opening, closing=closing, margin_std=margin_std
  )
  assert mask.dtype == jnp.bool_
  return np.asarray(mask)


# --- Inputs. ---


def gaussian_maps(rng, b, h, w, c):
  """`[B, H, W, C]` normal maps with a different scale and offset per channel."""
  scale = rng.uniform(0.1, 10.0, size=c)
  offset = rng.uniform(-5.0, 5.0, size=c)
  return (rng.standard_normal((b, h, w, c)) * scale + offset).astype(np.float32), scale, offset


def with_planted_outliers(rng, b, h, w, c, sizes=(1, 2, 3, 5, 8)):
  """Gaussian maps plus, per sample and channel, three square patches of +-(50..1000) std; a third touch a border."""
  x, scale, offset = gaussian_maps(rng, b, h, w, c)
  for i in range(b):
    for j in range(c):
      for s in rng.choice(sizes, size=3, replace=False):
        r, q = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        if rng.random() < 1 / 3:  # touch a border (or a corner)
          r = rng.choice([0, h - s])
          q = rng.choice([q, 0, w - s])
        sign = rng.choice([-1.0, 1.0])
        x[i, r : r + s, q : q + s, j] = offset[j] + sign * rng.uniform(50.0, 1000.0) * scale[j]
  return x


# --- 1. Parity with Algorithm 1. ---

PARITY_SHAPES = [(3, 32, 32, 3), (2, 48, 48, 4), (2, 24, 40, 3)]


# Every down factor, quantile and margin; the three shapes take turns (one compilation per case keeps this fast).
PARITY_CASES = [
  (down_f, quant, margin_std, PARITY_SHAPES[i % 3])
  for i, (down_f, quant, margin_std) in enumerate(itertools.product([1, 2, 4], [0.02, 0.05], [2.0, 0.5, 0.0]))
]


@pytest.mark.parametrize('down_f, quant, margin_std, shape', PARITY_CASES)
def test_mask_matches_algorithm_1(down_f, quant, margin_std, shape):
  rng = np.random.default_rng([down_f, int(quant * 100), int(margin_std * 10)])
  num_masked = 0
  for _ in range(2):
    x = with_planted_outliers(rng, *shape)
    ref = reference_mask(x, down_f=down_f, quant=quant, margin_std=margin_std)
    assert ref.shape == x.shape
    np.testing.assert_array_equal(jax_mask(x, quant=quant, down_f=down_f, margin_std=margin_std), ref)
    num_masked += np.count_nonzero(~ref)
  assert 0 < num_masked < x.size, 'the planted outliers should give a non-trivial mask'


def test_margin_uses_the_bessel_corrected_std():
  """`torch.std` divides by N - 1: a value between q_high + m_std0 and q_high + m_std1 is kept (it would be masked by a
  population std). The margin is chosen to put the map's maximum in the middle of that band."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal((1, 4, 4, 1)).astype(np.float32)
  x[0, 1, 2, 0] = 6.0
  flat = x.reshape(-1).astype(np.float64)
  quant = 0.1
  q_high = np.sort(flat)[quantile_ranks(16, quant)[1] - 1]
  band = (6.0 - q_high) / flat.std(ddof=1), (6.0 - q_high) / flat.std(ddof=0)  # margins that keep / mask the 6
  margin_std = float(np.mean(band))
  assert band[0] < 0.99 * margin_std and 1.01 * margin_std < band[1]
  for down_f in (1, 4):  # closing 1 at down factor 4: a lone masked value would be masked with its neighbours
    ref = reference_mask(x, down_f=down_f, quant=quant, margin_std=margin_std)
    assert ref.all()
    np.testing.assert_array_equal(jax_mask(x, quant=quant, down_f=down_f, margin_std=margin_std), ref)
  assert not jax_mask(x, quant=quant, down_f=4, margin_std=0.98 * float(band[0])).all()


@pytest.mark.parametrize('down_f', [1, 2, 4])
def test_kernel_sizes_match_algorithm_1(down_f):
  assert morphology_kernels(5, 3, down_f) == torch_kernels(5, 3, down_f)


def test_kernel_sizes_grown_for_higher_resolutions_stay_odd():
  """Documented deviation: Algorithm 1 would keep an even size, whose `MaxPool2d` shrinks the map by one pixel."""
  assert torch_kernels(10, 6, 1) == (10, 6)
  assert morphology_kernels(10, 6, 1) == (11, 7)
  assert morphology_kernels(10, 6, 2) == (5, 3)
  assert morphology_kernels(5, 3, 1.5) == (5, 1)  # ceil(5 / 1.5) = 4 -> 5; ceil(3 / 1.5) = 2 -> 1
  for opening in range(1, 13):
    for closing in range(1, 13):
      for down_f in (1, 2, 3, 4, 8):
        o, c = morphology_kernels(opening, closing, down_f)
        ref_o, ref_c = torch_kernels(opening, closing, down_f)
        assert o % 2 == 1 and c % 2 == 1
        assert (o, c) == (ref_o + (ref_o % 2 == 0), ref_c + (ref_c % 2 == 0))


@pytest.mark.parametrize('approx', [False, True])
@pytest.mark.parametrize('integer_valued', [False, True])
def test_kth_smallest_pair_matches_kthvalue(integer_valued, approx):
  rng = np.random.default_rng(int(integer_valued))
  if integer_valued:  # many ties
    x = rng.integers(-3, 4, size=(2, 3, 64)).astype(np.float32)
  else:
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
  t = torch.from_numpy(x)
  for k_low, k_high in [(1, 64), (1, 1), (64, 64), (2, 63), (5, 40), (32, 33)]:
    low, high = kth_fn(jnp.asarray(x), k_low, k_high, approx=approx)
    np.testing.assert_array_equal(np.asarray(low), t.kthvalue(k_low, dim=-1).values.numpy())
    np.testing.assert_array_equal(np.asarray(high), t.kthvalue(k_high, dim=-1).values.numpy())


def test_kth_smallest_pair_approx_equals_exact_on_cpu():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5, 1024)).astype(np.float32))
  for k_low, k_high in [(20, 1003), (51, 972)]:
    exact = kth_fn(x, k_low, k_high, approx=False)
    approx = kth_fn(x, k_low, k_high, approx=True)
    np.testing.assert_array_equal(np.asarray(approx[0]), np.asarray(exact[0]))
    np.testing.assert_array_equal(np.asarray(approx[1]), np.asarray(exact[1]))


def test_quantile_ranks():
  """Algorithm 1's `int(N * quant)`, `int(N * (1 - quant))`; rank 0 (a PyTorch error there) is clamped to 1."""
  for num in (64, 1024, 2304, 960):
    for quant in (0.02, 0.05, 0.25):
      assert quantile_ranks(num, quant) == (int(num * quant), int(num * (1 - quant)))
  assert quantile_ranks(16, 0.02) == (1, 15)  # int(0.32) = 0 -> 1: the minimum; int(15.68) = 15
  assert quantile_ranks(16, 0.0) == (1, 16)  # the minimum and the maximum


# --- 2. Behaviour. ---


@pytest.mark.parametrize('shape', [(4, 16, 16, 3), (4, 32, 32, 4), (2, 48, 40, 3)])
def test_gaussian_maps_are_kept_entirely_at_full_resolution(shape):
  """Without outliers nothing is masked at down factor 1: a lone tail value beyond the thresholds (about +-4 std) is
  a 1x1 hole that the closing max-filter fills."""
  for seed in range(3):
    x, _, _ = gaussian_maps(np.random.default_rng(seed), *shape)
    mask = jax_mask(x, quant=0.02, down_f=1)
    assert mask.shape == x.shape and mask.all(), f'seed {seed}: {np.count_nonzero(~mask)} positions masked'


@pytest.mark.parametrize('down_f', [2, 4])
@pytest.mark.parametrize('shape', [(4, 16, 16, 3), (4, 32, 32, 4), (2, 48, 40, 3)])
def test_gaussian_maps_at_lower_resolution_lose_only_lone_tail_values(shape, down_f):
  """At down factors 2 and 4 the closing kernel is 1, so a lone Gaussian value beyond q +- 2 std (about 4 std, a few
  percent of 1024-value maps have one) is masked with its 3x3 neighbourhood, as in Algorithm 1. Nothing else is."""
  for seed in range(3):
    x, scale, offset = gaussian_maps(np.random.default_rng(seed), *shape)
    mask = jax_mask(x, quant=0.02, down_f=down_f)
    assert mask.shape == x.shape
    np.testing.assert_array_equal(mask, reference_mask(x, down_f=down_f, quant=0.02))
    tail = np.abs((x - offset) / scale) > 3.5
    near_tail = np.zeros_like(tail)
    for dr in (-1, 0, 1):
      for dq in (-1, 0, 1):
        near_tail |= np.roll(tail, (dr, dq), axis=(1, 2))
    assert np.all(near_tail[~mask]), f'seed {seed}: a masked position has no tail value within 1 pixel'
    assert np.count_nonzero(~mask) <= 9 * np.count_nonzero(tail)


def spike_map(positions, size, h=32, w=32, c=3, seed=0):
  """Unit Gaussian `[1, H, W, C]` maps with `size`x`size` patches of 100 (100 std) at `positions` in channel 1."""
  x = np.random.default_rng(seed).standard_normal((1, h, w, c)).astype(np.float32)
  for r, q in positions:
    x[0, r : r + size, q : q + size, 1] = 100.0
  return x


def grown_rect(h, w, r, q, size, by):
  """bool `[H, W]`: the patch at (r, q) grown by `by` on every side, clipped to the map."""
  out = np.zeros((h, w), bool)
  out[max(r - by, 0) : r + size + by, max(q - by, 0) : q + size + by] = True
  return out


@pytest.mark.parametrize('down_f', [1, 2, 4])
@pytest.mark.parametrize('size', [4, 6])
@pytest.mark.parametrize('where', ['interior', 'corner', 'bottom edge'])
def test_large_spike_is_masked_with_its_neighbourhood(where, size, down_f):
  """A patch wider than the closing kernel survives the max-filter shrunk by its radius r_c, then the min-filter
  grows it by r_o: the masked region is the patch grown by r_o - r_c = 1 on each side, at every down factor here
  ((5, 3) -> 2 - 1; (3, 1) -> 1 - 0). On a border, padding never wins, so the patch neither shrinks nor grows there.
  The spike inflates the std (margin ~25), so no Gaussian value elsewhere is masked.
  """
  h, w = 48, 48  # 36 spike values stay under the 2% tail (46 of 2304), so the 98% quantile is a Gaussian one
  r, q = {'interior': (13, 9), 'corner': (0, 0), 'bottom edge': (h - size, 5)}[where]
  x = spike_map([(r, q)], size, h, w)
  mask = jax_mask(x, quant=0.02, down_f=down_f)
  expected = ~grown_rect(h, w, r, q, size, by=1)
  np.testing.assert_array_equal(mask[0, :, :, 1], expected)
  assert mask[0, :, :, [0, 2]].all()
  np.testing.assert_array_equal(mask, reference_mask(x, down_f=down_f, quant=0.02))


@pytest.mark.parametrize('size', [1, 2])
def test_small_spikes_are_filled_at_full_resolution(size):
  """Algorithm 1's first filter is a max-filter of the keep-mask (kernel 3 at down factor 1): a 1x1 or 2x2 hole in
  the interior has a kept neighbour in every 3x3 window, so it is filled and these spikes are NOT masked. (A 2x2
  patch in a corner is the exception: the padding never wins, so its corner pixel survives and is grown to 3x3.)
  At down factors 2 and 4 the closing kernel is 1, so the same spikes are masked, grown by the opening radius 1.
  """
  h = w = 32
  positions = [(5, 7), (20, 14), (12, 25)]
  x = spike_map(positions, size, h, w)
  mask = jax_mask(x, quant=0.02, down_f=1)
  assert mask.all()
  np.testing.assert_array_equal(mask, reference_mask(x, down_f=1, quant=0.02))
  for down_f in (2, 4):
    mask = jax_mask(x, quant=0.02, down_f=down_f)
    expected = ~np.any([grown_rect(h, w, r, q, size, by=1) for r, q in positions], axis=0)
    np.testing.assert_array_equal(mask[0, :, :, 1], expected)
    assert mask[0, :, :, [0, 2]].all()
  corner = spike_map([(0, 0)], 2, h, w)
  np.testing.assert_array_equal(jax_mask(corner, quant=0.02, down_f=1)[0, :, :, 1], ~grown_rect(h, w, 0, 0, 1, by=2))


def test_no_gradient_through_the_mask():
  x = jnp.asarray(with_planted_outliers(np.random.default_rng(7), 2, 32, 32, 3))
  mask = mask_fn(x)
  assert mask.dtype == jnp.bool_ and mask.shape == x.shape
  assert not bool(mask.all())
  grad = jax.jit(jax.grad(lambda f: jnp.sum(jnp.where(outlier_mask(f), f, 0.0))))(x)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(mask, np.float32))
  grad = jax.jit(jax.grad(lambda f: jnp.sum(outlier_mask(f).astype(jnp.float32))))(x)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bf16_gives_the_mask_of_its_float32_upcast():
  x = jnp.asarray(with_planted_outliers(np.random.default_rng(8), 2, 32, 32, 4)).astype(jnp.bfloat16)
  mask = mask_fn(x, down_factor=2)
  assert mask.dtype == jnp.bool_ and mask.shape == x.shape
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(mask_fn(x.astype(jnp.float32), down_factor=2)))
  np.testing.assert_array_equal(np.asarray(mask), reference_mask(np.asarray(x.astype(jnp.float32)), down_f=2))


# --- 3. No recompilation for new values. ---


def test_no_retrace_for_new_values():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(f):
    return outlier_mask(f, quant=0.05, down_factor=2)

  rng = np.random.default_rng(9)
  masks = [fn(jnp.asarray(with_planted_outliers(rng, 2, 16, 16, 3))) for _ in range(3)]
  assert len({np.asarray(m).tobytes() for m in masks}) == 3


# --- 4. Clear errors. ---


def test_errors():
  x = jnp.zeros((1, 8, 8, 2))
  for quant in (-0.01, 0.5, 0.7):
    with pytest.raises(ValueError, match=r'quant must be in \[0, 0.5\), got'):
      mask_fn(x, quant=quant)
  with pytest.raises(ValueError, match='margin_std must be >= 0, got -1.0'):
    mask_fn(x, margin_std=-1.0)
  with pytest.raises(ValueError, match='kernel sizes must be >= 1, got opening=0, closing=3'):
    mask_fn(x, opening=0)
  with pytest.raises(ValueError, match='kernel sizes must be >= 1, got opening=5, closing=0'):
    mask_fn(x, closing=0)
  for down_factor in (0, -2):
    with pytest.raises(ValueError, match=f'down_factor must be positive, got {down_factor}'):
      mask_fn(x, down_factor=down_factor)
  with pytest.raises(ValueError, match='at least 2 positions, got 1x1'):
    mask_fn(jnp.zeros((2, 1, 1, 3)))
  with pytest.raises(AssertionError, match=r'input 0 has rank 3 \(shape \(8, 8, 2\)\) but expected 4'):
    mask_fn(jnp.zeros((8, 8, 2)))


# --- 5. Degenerate maps. ---


def test_constant_maps_and_channels_follow_algorithm_1():
  """A constant channel has std 0, so m = 0 and q_low = q_high = the constant: the strict comparisons of Algorithm 1
  reject every value, and the whole channel is masked (no NaN). Constants whose mean is exact in float32, where
  PyTorch's std is exactly 0 too (for others its std can be rounding noise, see the next test).
  """
  for value in (0.0, 1.0, -2.0, 0.5):
    x = np.full((2, 16, 16, 3), value, np.float32)
    ref = reference_mask(x, down_f=1, quant=0.02)
    assert not ref.any()
    np.testing.assert_array_equal(jax_mask(x, quant=0.02, down_f=1), ref)
  x, _, _ = gaussian_maps(np.random.default_rng(10), 2, 16, 16, 3)
  x[1, :, :, 2] = 1.0  # one all-equal channel among Gaussian ones
  for down_f in (1, 2):
    ref = reference_mask(x, down_f=down_f, quant=0.02)
    mask = jax_mask(x, quant=0.02, down_f=down_f)
    np.testing.assert_array_equal(mask, ref)
    assert not mask[1, :, :, 2].any() and mask[0].all() and mask[1, :, :, :2].all()
  f = jnp.asarray(x)
  masked = jnp.where(mask_fn(f), f, 0.0)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(jnp.where(outlier_mask(f), f, 0.0))))(f)
  assert bool(jnp.isfinite(masked).all()) and bool(jnp.isfinite(grad).all())


def test_constant_channel_does_not_depend_on_its_value():
  """The std is taken of the data shifted by its first value, so it is exactly 0 for any constant map and the
  channel is always entirely masked. (A plain float32 std of 3.14159 * ones is ~1e-6 of rounding noise, which kept
  the whole channel; PyTorch's std has the same flaw for some constants, e.g. 1000.1.)"""
  masks = [
    jax_mask(np.full((1, 16, 16, 1), value, np.float32), quant=0.02, down_f=1) for value in (1.0, 3.14159, 1000.1, -7.3)
  ]
  for mask in masks:
    assert not mask.any()


@pytest.mark.parametrize('down_f', [1, 2, 4, 8])
def test_a_taps_kernels_cover_the_same_fraction_of_its_map_at_every_resolution(down_f):
  """At `scale` x the base resolution a tap's map is `scale` x larger: its kernels are `scale` x Algorithm 1's at the
  base, within the rounding to an odd size."""
  base = morphology_kernels(5, 3, down_f)
  assert base == torch_kernels(5, 3, down_f)  # the base resolution is Algorithm 1 itself
  for scale in (2.0, 3.0, 4.0):  # 512, 768, 1024 px for a base of 256
    grown = morphology_kernels(5, 3, down_f, scale)
    for k, k0 in zip(grown, base, strict=True):
      assert k % 2 == 1 and abs(k - k0 * scale) <= 1, (down_f, scale, grown, base)
  with pytest.raises(ValueError, match='kernel scale must be >= 1'):
    morphology_kernels(5, 3, 1, 0.5)


def test_a_half_resolution_tap_at_512_px():
  # (3, 1) at 256 px; growing the base kernels before dividing by the down factor gave (7, 5) at 512 px.
  assert morphology_kernels(5, 3, 2) == (3, 1)
  assert morphology_kernels(5, 3, 2, 2.0) == (7, 3)
