"""The x0-hat fidelity curve: timestep grid, metric functions against independent NumPy, and the probe with oracle,
zero and real denoisers on the tiny autoencoder."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import diffusion
from lpl_jax.diffusion.formulations import FLOW_TIME_SCALE
from lpl_jax.eval import small_domain
from lpl_jax.eval.reference import Extractor
from lpl_jax.models.dit import DiT
from lpl_jax.train import fidelity
from tests.tiny_autoencoder import tiny_autoencoder

SIDE, N = 32, 6  # image side (4x4 latents with the f8 tiny autoencoder), held-out images


def _images(seed=0, n=N):
  """Smooth random colour images (a random low-resolution field, upsampled) plus a little pixel noise, uint8."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, SIDE // 4, SIDE // 4, 3))
  smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


class Oracle:
  """A flax-free denoiser that returns the exact training target of the probe's own (z0, eps), rows picked by the
  `index` condition; `z0` and `eps` are set from the probe once it is built (before its first trace)."""

  def __init__(self, form):
    self.form, self.z0, self.eps = form, None, None

  def apply(self, variables, z_t, t, y, *, index):
    del variables, y
    t = t / FLOW_TIME_SCALE if self.form.is_flow else jnp.round(t).astype(jnp.int32)
    return self.form.target(jnp.asarray(self.z0)[index], jnp.asarray(self.eps)[index], t)


class Zeros:
  """A denoiser that always outputs 0 (for eps: x0_hat = z_t / alpha, noisier with the level)."""

  def apply(self, variables, z_t, t, y, **cond):
    return jnp.zeros_like(z_t)


@pytest.fixture(scope='module')
def ae():
  return tiny_autoencoder()


@pytest.fixture(scope='module')
def extractor():
  params = small_domain.SmallDomainCNN().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))['params']
  return Extractor('small_domain', jax.tree.map(np.asarray, params))


def _oracle_probe(ae, form, **kw):
  model = Oracle(form)
  probe = fidelity.FidelityProbe(
    model=model, form=form, ae_model=ae[0], ae_params=ae[1], images=_images(), conditions={'index': np.arange(N)}, **kw
  )
  model.z0, model.eps = probe.z0, probe.eps
  return probe


# --- timestep grid -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'kw',
  [
    dict(name='ddpm_eps'),
    dict(name='ddpm_v', schedule='linear', beta_start=1e-4, beta_end=0.02),
    dict(name='ddpm_v', zero_terminal_snr=True),
  ],
)
def test_ddpm_grid_is_the_brute_force_closest_timestep(kw):
  form = diffusion.get_formulation(kw.pop('name'), **kw)
  levels = np.concatenate([fidelity.DEFAULT_NOISE_LEVELS, [1e-3, 1.0, 1e3]])
  got = fidelity.grid_timesteps(form, levels)
  assert got.dtype == np.int32 and got.shape == levels.shape
  ac = np.asarray(form.alphas_cumprod, np.float64)
  for s, t in zip(levels, got, strict=True):
    best, best_dist = None, np.inf
    for i, a in enumerate(ac):
      if a == 0:
        continue
      dist = abs(np.log(np.sqrt((1 - a) / a)) - np.log(s))
      if dist < best_dist:
        best, best_dist = i, dist
    assert t == best, (s, t, best)


def test_flow_grid_is_exact():
  form = diffusion.get_formulation('flow_ot')
  got = fidelity.grid_timesteps(form, fidelity.DEFAULT_NOISE_LEVELS)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got / (1 - got.astype(np.float64)), fidelity.DEFAULT_NOISE_LEVELS, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(form.noise_level(jnp.asarray(got))), fidelity.DEFAULT_NOISE_LEVELS, rtol=1e-5)


def test_default_levels_and_bad_levels():
  np.testing.assert_allclose(fidelity.DEFAULT_NOISE_LEVELS, np.geomspace(0.05, 10.0, 8))
  form = diffusion.get_formulation('ddpm_eps')
  for bad in ([], [0.5, 0.0], [[1.0]], [np.inf], [-1.0]):
    with pytest.raises(ValueError, match='noise_levels'):
      fidelity.grid_timesteps(form, bad)


# --- metric functions ----------------------------------------------------------------------------------------------


def test_psnr_against_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(-1, 1, (3, 8, 8, 3)), rng.uniform(-1, 1, (3, 8, 8, 3))
  want = [10 * np.log10(4.0 / np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)]
  np.testing.assert_allclose(fidelity.psnr(a, b), want, rtol=1e-12)
  # A constant error of 0.02 on a peak-to-peak of 2: 20 log10(2 / 0.02) = 40 dB.
  np.testing.assert_allclose(fidelity.psnr(a + 0.02, a), 40.0, rtol=1e-9)
  assert np.all(np.isinf(fidelity.psnr(a, a)))
  with pytest.raises(ValueError, match='shape'):
    fidelity.psnr(a, b[:2])


def _ring_spectrum_sum(image: np.ndarray) -> float:
  """Independent: per channel np.fft.fft2, |F|^2 / (H W), the mean over each ring round(|f|) of the frequencies in
  cycles per image, summed over the rings above half the Nyquist radius, averaged over the channels."""
  h, w, c = image.shape
  nyquist = min(h, w) // 2
  total = 0.0
  for ch in range(c):
    power = np.abs(np.fft.fft2(image[..., ch])) ** 2 / (h * w)
    rings: dict[int, list[float]] = {}
    for u in range(h):
      for v in range(w):
        fu, fv = min(u, h - u), min(v, w - v)  # |frequency| in cycles per image (square images)
        r = int(np.rint(np.hypot(fu, fv)))
        rings.setdefault(r, []).append(power[u, v])
    total += sum(np.mean(p) for r, p in rings.items() if nyquist / 2 < r <= nyquist)
  return total / c


def test_high_frequency_power_against_fft():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 16, 16, 3))
  want = [_ring_spectrum_sum(x) for x in images]
  np.testing.assert_allclose(fidelity.high_frequency_power(images), want, rtol=1e-10)


def test_high_frequency_power_of_sinusoids():
  side = 32
  x = np.arange(side) / side
  high = np.broadcast_to(np.cos(2 * np.pi * 12 * x)[None, :, None], (side, side, 3))  # ring 12 > 16 / 2
  low = np.broadcast_to(np.cos(2 * np.pi * 4 * x)[None, :, None], (side, side, 3))  # ring 4
  fy, fx = np.meshgrid(np.fft.fftfreq(side) * side, np.fft.fftfreq(side) * side, indexing='ij')
  ring_12 = np.sum(np.rint(np.hypot(fy, fx)) == 12)
  # cos at frequency 12: two DFT coefficients of magnitude H W / 2, power (H W / 2)^2 / (H W) each, on ring 12.
  got = fidelity.high_frequency_power(np.stack([high, low, high + 1.0]))
  np.testing.assert_allclose(got, [2 * side * side / 4 / ring_12, 0.0, 2 * side * side / 4 / ring_12], atol=1e-9)


def _blur(images: np.ndarray) -> np.ndarray:
  """3x3 box blur with wrap-around."""
  return np.mean([np.roll(images, (i, j), axis=(1, 2)) for i in (-1, 0, 1) for j in (-1, 0, 1)], axis=0)


def test_hf_power_ratio_of_blur_is_negative_and_of_itself_zero():
  images = fidelity.to_float(_images(seed=3, n=4))
  assert fidelity.hf_power_ratio(images, images) == 0.0
  blurred = fidelity.hf_power_ratio(_blur(images), images)
  assert blurred < -0.3
  assert fidelity.hf_power_ratio(_blur(_blur(images)), images) < blurred
  assert fidelity.hf_power_ratio(images, _blur(images)) == pytest.approx(-blurred)
  want = np.log10(
    np.mean(fidelity.high_frequency_power(_blur(images))) / np.mean(fidelity.high_frequency_power(images))
  )
  assert blurred == pytest.approx(want, rel=1e-12)


def test_uint8_round_trip():
  images = _images(n=2)
  np.testing.assert_array_equal(fidelity.to_uint8(fidelity.to_float(images)), images)
  np.testing.assert_array_equal(np.asarray(fidelity.to_uint8(jnp.asarray(fidelity.to_float(images)))), images)


def test_curve_json_round_trip():
  levels = np.asarray(fidelity.DEFAULT_NOISE_LEVELS[:3])
  for timesteps in (np.asarray([10, 200, 900], np.int32), np.asarray([0.1, 0.5, 0.9], np.float32)):
    curve = fidelity.Curve(levels, timesteps, {'psnr': np.asarray([30.0, 20.0, np.inf])}, {'psnr': 31.5})
    back = fidelity.Curve.from_json(json.loads(json.dumps(curve.to_json())))
    np.testing.assert_array_equal(back.noise_levels, levels)
    np.testing.assert_array_equal(back.timesteps, timesteps)
    assert back.timesteps.dtype == timesteps.dtype
    np.testing.assert_array_equal(back.metrics['psnr'], curve.metrics['psnr'])
    assert back.ceiling == {'psnr': 31.5}
  with pytest.raises(ValueError, match='one value per noise level'):
    fidelity.Curve(levels, timesteps[:2], {}, {})


# --- the probe -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_oracle_reaches_the_ceiling_with_one_compilation(ae, extractor):
  form = diffusion.get_formulation('ddpm_eps')
  probe = _oracle_probe(ae, form, extractor=extractor, batch_size=4)  # two batches, the last one padded
  curve = probe.curve(None)
  assert probe.traces == 1  # one trace for every level and batch
  levels = len(fidelity.DEFAULT_NOISE_LEVELS)
  assert set(curve.metrics) == {'psnr', 'psnr_recon', 'hf_power_ratio', 'feature_distance'}
  assert set(curve.ceiling) == {'psnr', 'hf_power_ratio', 'feature_distance'}
  assert all(v.shape == (levels,) for v in curve.metrics.values())
  np.testing.assert_array_equal(curve.timesteps, fidelity.grid_timesteps(form, fidelity.DEFAULT_NOISE_LEVELS))
  # x0_hat = z0 up to float32 rounding: the decoder's reconstruction at every level.
  assert np.all(curve.metrics['psnr_recon'] > 60)
  np.testing.assert_allclose(curve.metrics['psnr'], curve.ceiling['psnr'], atol=1e-3)
  np.testing.assert_allclose(curve.metrics['hf_power_ratio'], curve.ceiling['hf_power_ratio'], atol=1e-3)
  np.testing.assert_allclose(curve.metrics['feature_distance'], curve.ceiling['feature_distance'], atol=1e-2)
  # The ceiling against independent computations from the probe's own reconstruction.
  real = fidelity.to_float(probe.images)
  assert curve.ceiling['psnr'] == pytest.approx(np.mean(fidelity.psnr(probe.recon, real)), rel=1e-9)
  assert curve.ceiling['hf_power_ratio'] == pytest.approx(fidelity.hf_power_ratio(probe.recon, real), rel=1e-9)
  feats = [np.asarray(extractor.apply(extractor.params, x)) for x in (fidelity.to_uint8(probe.recon), probe.images)]
  want = np.mean(np.linalg.norm(feats[0] - feats[1], axis=-1))
  assert curve.ceiling['feature_distance'] == pytest.approx(want, rel=1e-4, abs=1e-5)
  # A second curve reuses the compilation.
  probe.curve(None)
  assert probe.traces == 1


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ddpm_v', 'flow_ot'])
def test_oracle_of_other_formulations(ae, name):
  probe = _oracle_probe(ae, diffusion.get_formulation(name), noise_levels=(0.1, 3.0), batch_size=8)
  curve = probe.curve(None)
  assert 'feature_distance' not in curve.metrics and 'feature_distance' not in curve.ceiling
  assert np.all(curve.metrics['psnr_recon'] > 60)
  np.testing.assert_allclose(curve.metrics['psnr'], curve.ceiling['psnr'], atol=1e-3)


class PixelAutoencoder:
  """A flax-free perfect autoencoder: the latents are the images themselves (encode and decode are identities), so
  the probe's image metrics see the denoiser alone."""

  def apply(self, variables, x, method):
    return method(x)

  def encode(self, x):
    return x, jnp.zeros_like(x)

  def decode(self, z):
    return z

  def scale_latents(self, z):
    return z

  def unscale_latents(self, z):
    return z


def test_zero_denoiser_degrades_with_noise_through_a_perfect_autoencoder():
  form = diffusion.get_formulation('ddpm_eps')
  probe = fidelity.FidelityProbe(
    model=Zeros(), form=form, ae_model=PixelAutoencoder(), ae_params={}, images=_images(), conditions={}
  )
  curve = probe.curve(None)
  assert curve.ceiling['psnr'] == np.inf and curve.ceiling['hf_power_ratio'] == 0.0
  psnr, hf = curve.metrics['psnr'], curve.metrics['hf_power_ratio']
  # x0_hat = x + (sigma / alpha) eps, clipped: 20 log10(2 / 0.05) = 32 dB at the first level, less at every next one.
  assert 25 < psnr[0] < 33 and np.all(np.diff(psnr) < 0), psnr
  np.testing.assert_array_equal(curve.metrics['psnr_recon'], psnr)  # the reconstruction is the image itself
  assert np.all(np.diff(hf) > 0) and hf[-1] > 0.5, hf  # white noise adds high-frequency power


@pytest.mark.slow
def test_zero_denoiser_degrades_with_noise(ae):
  form = diffusion.get_formulation('ddpm_eps')
  probe = fidelity.FidelityProbe(
    model=Zeros(), form=form, ae_model=ae[0], ae_params=ae[1], images=_images(), conditions={}, batch_size=N
  )
  curve = probe.curve(None)
  # The random decoder's images are unrelated to the real ones (psnr is near chance at every level); against the
  # reconstruction the noise shows.
  recon = curve.metrics['psnr_recon']
  assert np.all(np.diff(recon) < 0) and recon[0] < 60, recon
  assert np.all(curve.metrics['psnr'] < curve.ceiling['psnr'] + 1.0)


@pytest.mark.slow
def test_class_conditional_dit_is_independent_of_the_batch_size(ae):
  model = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10, in_channels=4)
  params = model.init(jax.random.key(1), jnp.zeros((1, 4, 4, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))['params']
  form = diffusion.get_formulation('ddpm_eps')
  kw = dict(model=model, form=form, ae_model=ae[0], ae_params=ae[1], images=_images(), seed=5)
  labels = {'y': np.arange(N, dtype=np.int32) % 10}
  curves = []
  for batch_size in (4, 64):
    probe = fidelity.FidelityProbe(**kw, conditions=labels, batch_size=batch_size)
    curves.append(probe.curve(params))
    assert probe.traces == 1
  assert probe.batch_size == N  # capped at the number of images
  for k, v in curves[0].metrics.items():
    assert np.all(np.isfinite(v)), k
    np.testing.assert_allclose(v, curves[1].metrics[k], rtol=1e-4, err_msg=k)
  with pytest.raises(ValueError, match='one row per image'):
    fidelity.FidelityProbe(**kw, conditions={'y': labels['y'][:3]})
