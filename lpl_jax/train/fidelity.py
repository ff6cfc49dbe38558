"""The x0-hat fidelity curve: how close the denoiser's one-step clean estimate is to real images, per noise level.

The latent perceptual loss acts on `x0_hat`, the clean latent the model predicts in one step from `z_t`. This probe
measures that estimate in image space on held-out real images `x`, at a fixed grid of noise levels `s = sigma/alpha`:

  z0        = scale_latents(posterior mean of encode(x))       recon = decode(z0), the autoencoder's ceiling
  t_j       = the formulation's timestep with noise level closest to s_j (`grid_timesteps`)
  z_t       = add_noise(z0, eps, t_j)                           eps: one fixed normal draw per image, every level
  image_hat = decode(unscale_latents(x0_hat(z_t, model(z_t, t_j, conditions), t_j))), clipped to [-1, 1]

Metrics per level, over the N images (`Curve.metrics`, each `[L]`):
  psnr              mean over images of the PSNR of image_hat against x (both in [-1, 1], peak-to-peak 2)
  psnr_recon        the same against recon: what the denoiser can reach through this decoder
  hf_power_ratio    log10(high-frequency power of image_hat / that of x), `high_frequency_power` averaged over the
                    images first (a ratio of batch means). 0 = as much fine detail as the real images; negative =
                    blurrier (-1 is a tenth of their high-frequency power); positive = more (noise, artefacts)
  feature_distance  mean over images of the L2 distance between extractor features of uint8(image_hat) and of x
                    (only with an extractor)
and the reconstruction's own `psnr`, `hf_power_ratio` and `feature_distance` against x (`Curve.ceiling`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax.diffusion import Formulation
from lpl_jax.eval.spectrum import radial_bins

DEFAULT_NOISE_LEVELS = tuple(float(s) for s in np.geomspace(0.05, 10.0, 8))  # sigma/alpha
PEAK_TO_PEAK = 2.0  # images in [-1, 1]
_FFT_CHUNK = 16  # images per host FFT (complex128 memory: _FFT_CHUNK * H * W * C * 16 bytes)


def grid_timesteps(form: Formulation, noise_levels: Sequence[float]) -> np.ndarray:
  """The formulation's timesteps `[L]` whose noise level sigma/alpha is closest to each of `noise_levels`.

  DDPM: the integer timestep minimising `|log noise_level(t) - log s|`, from the float64 schedule (int32; the first
  of equally close ones). Flows: `t = s / (1 + s)` exactly (float32), since sigma/alpha = t / (1 - t).

  Raises:
    ValueError: `noise_levels` is not a non-empty 1-D sequence of positive finite values.
  """
  levels = np.asarray(noise_levels, np.float64)
  if levels.ndim != 1 or not levels.size or not np.all(np.isfinite(levels) & (levels > 0)):
    raise ValueError(f'noise_levels must be a non-empty 1-D sequence of positive finite values; got {noise_levels}.')
  if form.is_flow:
    return (levels / (1.0 + levels)).astype(np.float32)
  ac = np.asarray(form.alphas_cumprod, np.float64)
  with np.errstate(divide='ignore'):  # alpha = 0 (zero terminal SNR): +inf, never the closest to a finite level
    log_noise = 0.5 * (np.log1p(-ac) - np.log(ac))
  return np.argmin(np.abs(log_noise[None, :] - np.log(levels)[:, None]), axis=1).astype(np.int32)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> float32 in [-1, 1] (`x / 127.5 - 1`)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """Images in [-1, 1] -> uint8 (clipped, rounded); NumPy in, NumPy out, JAX in, JAX out."""
  xp = jnp if isinstance(images, jax.Array) else np
  return xp.round((xp.clip(images, -1, 1) + 1) * 127.5).astype(xp.uint8)


def psnr(images: np.ndarray, reference: np.ndarray, peak_to_peak: float = PEAK_TO_PEAK) -> np.ndarray:
  """Per-image PSNR in dB, `[N]`: `10 log10(peak_to_peak^2 / mse)` over all pixels and channels of each image
  (+inf for identical images). Float images `[N, ...]` of the same shape."""
  a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'psnr: images {a.shape} and reference {b.shape} differ in shape.')
  mse = np.mean(np.square(a - b).reshape(a.shape[0], -1), axis=1)
  with np.errstate(divide='ignore'):
    return 10.0 * np.log10(peak_to_peak**2 / mse)


@functools.cache
def high_frequency_weights(height: int, width: int) -> np.ndarray:
  """`[H, W]` weights of the DFT frequencies: `1 / (ring size)` on the rings of `radial_bins` above half the Nyquist
  radius (`f > (min(H, W) // 2) / 2`), 0 elsewhere. `sum(P * weights)` is the radially averaged spectrum `S(f)`
  (`lpl_jax.eval.spectrum`) summed over those rings."""
  bins, num_bins = radial_bins(height, width)
  counts = np.bincount(bins[bins >= 0], minlength=num_bins)
  high = np.arange(num_bins) > (num_bins - 1) / 2
  per_bin = np.where(high, 1.0 / np.maximum(counts, 1), 0.0)
  return np.where(bins >= 0, per_bin[bins], 0.0)


def high_frequency_power(images: np.ndarray) -> np.ndarray:
  """Per-image high-frequency power `[N]` of float images `[N, H, W, C]` (taken as they are).

  With `P(u, v) = |DFT2(x[..., c])(u, v)|^2 / (H W)` averaged over the channels, it is the radially averaged power
  spectrum `S(f)` (`lpl_jax.eval.spectrum`'s definition) summed over the rings `f` above half the Nyquist radius.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'images must be [N, H, W, C]; got shape {images.shape}.')
  n, h, w, _ = images.shape
  weights = high_frequency_weights(h, w)
  out = np.empty(n, np.float64)
  for i in range(0, n, _FFT_CHUNK):
    power = np.abs(np.fft.fft2(np.asarray(images[i : i + _FFT_CHUNK], np.float64), axes=(1, 2))) ** 2 / (h * w)
    out[i : i + _FFT_CHUNK] = np.einsum('nhwc,hw->n', power, weights) / images.shape[-1]
  return out


def log_power_ratio(power: np.ndarray, reference_power: np.ndarray) -> float:
  """`log10(mean(power) / mean(reference_power))` of per-image powers: the means are taken first."""
  with np.errstate(divide='ignore', invalid='ignore'):
    return float(np.log10(np.mean(power) / np.mean(reference_power)))


def hf_power_ratio(images: np.ndarray, reference: np.ndarray) -> float:
  """`log10` of the mean high-frequency power (`high_frequency_power`) of `images` over that of `reference`, both
  float `[N, H, W, C]` on one scale: 0 for equal detail, negative when `images` are blurrier."""
  return log_power_ratio(high_frequency_power(images), high_frequency_power(reference))


def probe_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
  """The probe's fixed noise `eps`, float32 `shape` (`[N, h, w, C]`): one normal draw from `jax.random.key(seed)`,
  so each image's noise does not depend on the batch size."""
  return np.asarray(jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Curve:
  """A fidelity curve (module docstring).

  Attributes:
    noise_levels: `[L]` the requested grid of sigma/alpha.
    timesteps: `[L]` the formulation's timesteps used for them (`grid_timesteps`).
    metrics: name -> `[L]`: `psnr`, `psnr_recon`, `hf_power_ratio` and, with an extractor, `feature_distance`.
    ceiling: the reconstruction's `psnr`, `hf_power_ratio` (and `feature_distance`) against the real images.
  """

  noise_levels: np.ndarray
  timesteps: np.ndarray
  metrics: dict[str, np.ndarray]
  ceiling: dict[str, float]

  def __post_init__(self):
    size = len(self.noise_levels)
    if len(self.timesteps) != size or any(len(v) != size for v in self.metrics.values()):
      raise ValueError(f'Curve: timesteps and every metric need one value per noise level ({size}).')

  def to_json(self) -> dict[str, Any]:
    """Plain Python lists and floats (an identical image pair's PSNR is +inf, which `json` writes as Infinity)."""
    return {
      'noise_levels': np.asarray(self.noise_levels).tolist(),
      'timesteps': np.asarray(self.timesteps).tolist(),
      'metrics': {k: np.asarray(v, np.float64).tolist() for k, v in self.metrics.items()},
      'ceiling': {k: float(v) for k, v in self.ceiling.items()},
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Curve:
    """The curve `to_json` wrote: int32 timesteps where they are integers (DDPM), float32 otherwise (flows)."""
    timesteps = np.asarray(d['timesteps'])
    timesteps = timesteps.astype(np.int32 if np.issubdtype(timesteps.dtype, np.integer) else np.float32)
    return cls(
      noise_levels=np.asarray(d['noise_levels'], np.float64),
      timesteps=timesteps,
      metrics={k: np.asarray(v, np.float64) for k, v in d['metrics'].items()},
      ceiling={k: float(v) for k, v in d['ceiling'].items()},
    )


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`x [n, ...]` with its last row repeated up to `size` rows."""
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


class FidelityProbe:
  """The x0-hat fidelity curve of a denoiser on held-out images (module docstring), built once per run.

  The images are encoded once (z0, the reconstruction and, with an extractor, the real features); then `curve`
  runs one jitted function `image_hat(params, z0_batch, eps_batch, cond_batch, t)` per batch and level, with `t` a
  traced scalar, so that the levels share one compilation (`traces` counts its traces). Batches have `batch_size`
  rows (at most N), the last one padded with copies of its last row. The reconstruction is kept on the host in
  float32 (N x H x W x 3 x 4 bytes).

  Args:
    model: the denoiser, `model.apply({'params': params}, z_t, form.model_time(t), y, **cond)` as in the train step.
    form: its formulation.
    ae_model, ae_params: the autoencoder whose latents the model denoises.
    images: uint8 `[N, R, R, 3]` held-out real images.
    conditions: name -> `[N, ...]` arrays fed as the train step feeds them: `'y'` goes to the model's third argument
      (e.g. `{'y': labels}`, or the null class for an unconditional run of a class model), the others as keywords
      (`{'context': ..., 'pooled': ...}` for text models); `{}` passes `y=None`.
    noise_levels: the grid of sigma/alpha.
    seed: of the fixed noise (`probe_noise`).
    extractor: an `lpl_jax.eval.reference.Extractor` (`.name`, `.params`, `.apply(params, uint8 [B, H, W, 3])`), or
      None for no `feature_distance`.
    batch_size: rows per call.
  """

  def __init__(
    self,
    *,
    model: Any,
    form: Formulation,
    ae_model: Any,
    ae_params: Any,
    images: np.ndarray,
    conditions: Mapping[str, np.ndarray],
    noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS,
    seed: int = 0,
    extractor: Any = None,
    batch_size: int = 64,
  ):
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or not len(images):
      raise ValueError(f'images must be uint8 [N, R, R, 3] with N >= 1; got {images.dtype} {images.shape}.')
    n = len(images)
    for name, value in conditions.items():
      if np.shape(value)[:1] != (n,):
        raise ValueError(f'conditions[{name!r}] has shape {np.shape(value)}; it needs one row per image ({n}).')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}; expected >= 1.')
    self.form, self.images, self.extractor = form, images, extractor
    self.noise_levels = np.asarray(noise_levels, np.float64)
    self.timesteps = grid_timesteps(form, self.noise_levels)
    self.batch_size = min(batch_size, n)
    self.traces = 0  # how often `image_hat` was traced: once per probe
    self._ae_params = jax.device_put(ae_params)
    self._ext_params = None if extractor is None else jax.device_put(extractor.params)

    def encode(ae_params, x):  # float [B, R, R, 3] in [-1, 1] (`to_float`, as the metrics see it) -> (z0, recon)
      mean, _ = ae_model.apply({'params': ae_params}, x, method=ae_model.encode)
      recon = ae_model.apply({'params': ae_params}, mean, method=ae_model.decode)
      return ae_model.scale_latents(mean), jnp.clip(recon, -1.0, 1.0)

    def image_hat(ae_params, params, z0, eps, cond, t):
      self.traces += 1
      t = jnp.full((z0.shape[0],), t)
      z_t = form.add_noise(z0, eps, t)
      cond = dict(cond)
      pred = model.apply({'params': params}, z_t, form.model_time(t), cond.pop('y', None), **cond)
      x0_hat = form.x0_hat(z_t, pred, t).astype(jnp.float32)
      images = ae_model.apply({'params': ae_params}, ae_model.unscale_latents(x0_hat), method=ae_model.decode)
      return jnp.clip(images, -1.0, 1.0)

    self._encode = jax.jit(encode)
    self._image_hat = jax.jit(image_hat)
    self.image_hat = functools.partial(self._image_hat, self._ae_params)
    if extractor is not None:
      self._features = jax.jit(lambda p, x: extractor.apply(p, x if x.dtype == jnp.uint8 else to_uint8(x)))

    z0, recon = [], []
    for start, rows in self._row_batches():
      z, r = self._encode(self._ae_params, _pad_rows(to_float(images[start : start + rows]), self.batch_size))
      z0.append(np.asarray(z)[:rows])
      recon.append(np.asarray(r)[:rows])
    self.z0 = np.concatenate(z0)  # [N, h, w, C] scaled latents
    self.recon = np.concatenate(recon)  # [N, R, R, 3] float32 in [-1, 1]
    self.eps = probe_noise(seed, self.z0.shape)
    self._batches = [
      (
        start,
        rows,
        *(jnp.asarray(_pad_rows(a[start : start + rows], self.batch_size)) for a in (self.z0, self.eps)),
        {
          k: jnp.asarray(_pad_rows(np.asarray(v)[start : start + rows], self.batch_size)) for k, v in conditions.items()
        },
      )
      for start, rows in self._row_batches()
    ]
    self._real_hf = high_frequency_power(to_float(images))
    self._real_features = None if extractor is None else self._features_of(images)
    self.ceiling = self._summary(self._per_image(self.recon, np.arange(n), against_recon=False))

  def _row_batches(self) -> Iterator[tuple[int, int]]:
    """`(first row, valid rows)` of each batch."""
    n = len(self.images)
    for start in range(0, n, self.batch_size):
      yield start, min(self.batch_size, n - start)

  def _features_of(self, images: np.ndarray) -> np.ndarray:
    """Extractor features `[M, D]` of images `[M, R, R, 3]` (uint8, or float in [-1, 1]), in padded batches."""
    out = []
    for start in range(0, len(images), self.batch_size):
      rows = images[start : start + self.batch_size]
      out.append(np.asarray(self._features(self._ext_params, _pad_rows(rows, self.batch_size)))[: len(rows)])
    return np.concatenate(out)

  def _per_image(self, images: np.ndarray, index: np.ndarray, *, against_recon: bool) -> dict[str, np.ndarray]:
    """Per-image values `[M]` of float images `[M, R, R, 3]` in [-1, 1] against the real images of rows `index`:
    `psnr`, `hf_power`, `feature_distance` (with an extractor) and, `against_recon`, `psnr_recon`."""
    out = {'psnr': psnr(images, to_float(self.images[index]))}
    if against_recon:
      out['psnr_recon'] = psnr(images, self.recon[index])
    out['hf_power'] = high_frequency_power(images)
    if self.extractor is not None:
      diff = np.asarray(self._features_of(images), np.float64) - self._real_features[index]
      out['feature_distance'] = np.linalg.norm(diff, axis=-1)
    return out

  def _summary(self, per_image: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means over the images; `hf_power` becomes `hf_power_ratio` against the real images."""
    out = {k: float(np.mean(v)) for k, v in per_image.items() if k != 'hf_power'}
    out['hf_power_ratio'] = log_power_ratio(per_image['hf_power'], self._real_hf)
    return out

  def curve(self, params: Any) -> Curve:
    """The fidelity curve of the denoiser with `params` (`Curve`)."""
    metrics: dict[str, list[float]] = {}
    for t in self.timesteps:
      t = jnp.asarray(t)
      per_image: dict[str, list[np.ndarray]] = {}
      for start, rows, z0, eps, cond in self._batches:
        images = np.asarray(self.image_hat(params, z0, eps, cond, t))[:rows]
        for k, v in self._per_image(images, np.arange(start, start + rows), against_recon=True).items():
          per_image.setdefault(k, []).append(v)
      for k, v in self._summary({k: np.concatenate(v) for k, v in per_image.items()}).items():
        metrics.setdefault(k, []).append(v)
    return Curve(
      noise_levels=self.noise_levels.copy(),
      timesteps=self.timesteps.copy(),
      metrics={k: np.asarray(v, np.float64) for k, v in metrics.items()},
      ceiling=dict(self.ceiling),
    )
