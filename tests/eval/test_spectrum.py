"""Radially averaged power spectra against a direct NumPy loop, on hand-made and random images; the figure."""

import numpy as np
import pytest
from PIL import Image

from lpl_jax import eval as lpl_eval


def numpy_spectrum(images):
  """Per image and channel: |fft2|^2 / (H W); each frequency to the ring round(radius); ring means; set mean."""
  images = np.asarray(images)
  images = images / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
  n, h, w, c = images.shape
  side = min(h, w)
  num_bins = side // 2 + 1
  sums, counts = np.zeros(num_bins), np.zeros(num_bins)
  for u in range(h):
    for v in range(w):
      fu = (u if u <= (h - 1) // 2 else u - h) * side / h  # fftfreq's ordering, in cycles per image
      fv = (v if v <= (w - 1) // 2 else v - w) * side / w
      b = int(np.rint(np.hypot(fu, fv)))
      if b < num_bins:
        counts[b] += 1
        for i in range(n):
          for ch in range(c):
            sums[b] += np.abs(np.fft.fft2(images[i, :, :, ch])[u, v]) ** 2 / (h * w)
  return sums / (counts * n * c)


@pytest.mark.parametrize('shape', [(3, 16, 16, 3), (2, 12, 20, 1)])
def test_matches_numpy_loop(shape):
  images = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
  np.testing.assert_allclose(lpl_eval.radial_power_spectrum(images, batch_size=2), numpy_spectrum(images), rtol=2e-5)


@pytest.mark.parametrize('freq,axis', [(5, 'x'), (9, 'y'), (3, 'diag')])
def test_sinusoid_peaks_at_its_frequency(freq, axis):
  size = 32
  y, x = np.mgrid[:size, :size] / size
  phase = {'x': x * freq, 'y': y * freq, 'diag': (x + y) * freq}[axis]
  image = 0.5 + 0.4 * np.cos(2 * np.pi * phase)
  images = np.repeat(image[None, :, :, None], 3, axis=-1)
  spec = lpl_eval.radial_power_spectrum(images)
  expected_bin = int(np.rint(freq * np.sqrt(2))) if axis == 'diag' else freq
  assert spec.shape == (size // 2 + 1,)
  assert int(np.argmax(spec[1:])) + 1 == expected_bin  # bin 0 holds the mean (0.5)
  others = np.delete(spec, [0, expected_bin])
  assert np.max(others) < 1e-10 * spec[expected_bin]
  # Parseval: the total power of the wave is (0.4^2 / 2) * H * W, spread over the ring's members.
  bins, _ = lpl_eval.spectrum.radial_bins(size, size)
  assert spec[expected_bin] * np.sum(bins == expected_bin) == pytest.approx(0.4**2 / 2 * size * size, rel=1e-5)


def test_uint8_is_scaled_to_unit_range():
  images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(lpl_eval.radial_power_spectrum(images), numpy_spectrum(images), rtol=2e-5)


def test_plot_spectrum_difference_writes_png(tmp_path):
  rng = np.random.default_rng(2)
  y, x = np.mgrid[:32, :32] / 32
  waves = [np.cos(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6)) for fx, fy in ((1, 0), (0, 2), (2, 3))]
  smooth = (0.5 + 0.1 * sum(waves))[None, :, :, None] + 1e-3 * rng.normal(size=(4, 32, 32, 3))  # low frequencies
  noisy = smooth + 0.05 * rng.normal(size=smooth.shape)
  spec_a, spec_b = lpl_eval.radial_power_spectrum(noisy), lpl_eval.radial_power_spectrum(smooth)
  diff = lpl_eval.log_spectrum_difference(spec_a, spec_b)
  np.testing.assert_allclose(diff, np.log10(spec_a / spec_b), rtol=0, atol=1e-12)
  assert diff[-1] > 0.5  # the added noise dominates the highest frequencies
  path = tmp_path / 'spectrum.png'
  lpl_eval.plot_spectrum_difference(spec_a, spec_b, ('noisy', 'smooth'), path)
  with Image.open(path) as png:
    assert png.format == 'PNG' and png.size[0] > 400 and png.size[1] > 400
  with pytest.raises(ValueError, match='different lengths'):
    lpl_eval.log_spectrum_difference(spec_a, spec_b[:-1])
