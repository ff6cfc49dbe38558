"""Radially averaged power spectra of image sets, and the plot of their difference (the paper's Figures 4-5).

Definition used here, for `[N, H, W, C]` images (uint8 scaled to [0, 1], floats taken as they are):
  P_n,c(u, v) = |DFT2(x_n[..., c])(u, v)|^2 / (H W)     per image and channel (mean not removed: DC is bin 0)
  P(u, v)     = mean over images and over the C channels (the colour channels are averaged, not converted to
                grayscale)
  S(f)        = mean of P(u, v) over the frequencies with round(sqrt(u^2 + v^2)) == f,  f = 0 .. min(H, W) // 2
with `u`, `v` integer frequencies in cycles per image (for non-square images scaled to the shorter side). Corners
beyond the Nyquist radius are left out. The paper compares such spectra of 10k generated images per model with
real ones (section 4.3, "Frequency analysis"): `f` is its horizontal axis.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@functools.cache
def radial_bins(height: int, width: int) -> tuple[np.ndarray, int]:
  """`([H, W] int bin of each DFT frequency, number of bins)`; frequencies past the Nyquist radius get bin -1."""
  side = min(height, width)
  fy = np.fft.fftfreq(height) * side
  fx = np.fft.fftfreq(width) * side
  radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
  num_bins = side // 2 + 1
  bins = np.rint(radius).astype(np.int32)
  return np.where(bins < num_bins, bins, -1), num_bins


@functools.partial(jax.jit, static_argnames=('num_bins',))
def _radial_sums(images: jax.Array, bins: jax.Array, num_bins: int) -> jax.Array:
  """`[B, H, W, C]` -> `[num_bins]` sum over images, channels and ring members of the power."""
  _, h, w, _ = images.shape
  power = jnp.abs(jnp.fft.fft2(images, axes=(1, 2))) ** 2 / (h * w)
  power = jnp.sum(power, axis=(0, 3)).reshape(-1)
  flat = bins.reshape(-1)
  # Out-of-range frequencies (bin -1) go to an extra segment that is dropped.
  return jax.ops.segment_sum(power, jnp.where(flat < 0, num_bins, flat), num_segments=num_bins + 1)[:num_bins]


def radial_power_spectrum(images: np.ndarray | jax.Array, *, batch_size: int = 64) -> np.ndarray:
  """Radially averaged power spectrum `S(f)` (module docstring) of a set of images.

  Args:
    images: `[N, H, W, C]` uint8 (scaled to [0, 1]) or float.
    batch_size: images per FFT batch (memory is `batch_size * H * W * C` complex values).

  Returns:
    `[min(H, W) // 2 + 1]` float64 spectrum; index `f` is the frequency in cycles per image.
  """
  images = np.asarray(images) if not isinstance(images, jax.Array) else images
  if images.ndim != 4:
    raise ValueError(f'images must be [N, H, W, C]; got shape {images.shape}.')
  n, h, w, c = images.shape
  scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
  bins, num_bins = radial_bins(h, w)
  total = np.zeros(num_bins, np.float64)
  for i in range(0, n, batch_size):
    batch = jnp.asarray(images[i : i + batch_size], jnp.float32) * scale
    total += np.asarray(_radial_sums(batch, jnp.asarray(bins), num_bins), np.float64)
  counts = np.bincount(bins[bins >= 0], minlength=num_bins)
  return total / (counts * n * c)


def log_spectrum_difference(spec: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """`log10 S(f) - log10 S_ref(f)`: the difference of the log power spectra, i.e. the log of their ratio (0: same
  power at that frequency, +1: ten times more power than the reference)."""
  spec, reference = np.asarray(spec, np.float64), np.asarray(reference, np.float64)
  if spec.shape != reference.shape:
    raise ValueError(f'spectra have different lengths: {spec.shape} and {reference.shape} (same image size?).')
  tiny = np.finfo(np.float64).tiny
  return np.log10(np.maximum(spec, tiny)) - np.log10(np.maximum(reference, tiny))


def plot_spectrum_difference(
  spec_a: np.ndarray, spec_b: np.ndarray, labels: Sequence[str], path: str | os.PathLike
) -> None:
  """Writes a PNG comparing two radially averaged power spectra, in the manner of the paper's Figures 4-5.

  Top: both log power spectra against frequency. Bottom: `log10 S_a(f) - log10 S_b(f)` (`log_spectrum_difference`),
  with the zero line: above it, set `a` has more power at that frequency than set `b`.

  Args:
    spec_a: `[F]` spectrum of the first set (e.g. samples with LPL).
    spec_b: `[F]` spectrum of the second set, the reference of the difference (e.g. without LPL, or real images).
    labels: `(label_a, label_b)`.
    path: output `.png`.
  """
  if len(labels) != 2:
    raise ValueError(f'labels must name the two spectra (label_a, label_b); got {labels!r}.')
  diff = log_spectrum_difference(spec_a, spec_b)
  freqs = np.arange(diff.shape[0])
  fig = Figure(figsize=(6.4, 6.0), layout='constrained')
  FigureCanvasAgg(fig)
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.semilogy(freqs, spec_a, label=labels[0])
  top.semilogy(freqs, spec_b, label=labels[1])
  top.set_ylabel('power')
  top.set_title('Radially averaged power spectrum')
  top.legend()
  bottom.plot(freqs, diff, color='C2')
  bottom.axhline(0.0, color='k', linewidth=0.8)
  bottom.set_xlabel('frequency f (cycles per image)')
  bottom.set_ylabel(f'log10 P({labels[0]}) - log10 P({labels[1]})')
  fig.savefig(os.fspath(path), dpi=120)
