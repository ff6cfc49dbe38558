"""Loss terms of the KL autoencoder recipe of LDM (Rombach et al. 2022, `LPIPSWithDiscriminator` of taming/LDM).

Every function takes arrays and returns one value per example `[B]` (reduction is left to the caller), except
`adaptive_weight`, which works on gradients. Images are NHWC in [-1, 1].

The perceptual term is NOT LPIPS: LPIPS needs a pretrained VGG, and nothing is downloaded here. `ssim_loss` is a
multi-scale structural-similarity loss (SSIM of Wang et al. 2004 on an average-pooled pyramid), which needs no
weights and rewards local contrast and structure that an L1/L2 loss alone blurs away.

References:
  Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models (appendix G).
  Esser et al. 2021, Taming Transformers for High-Resolution Image Synthesis (eq. 7, the adaptive weight).
  Wang et al. 2004, Image Quality Assessment: From Error Visibility to Structural Similarity (eq. 13).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al.'s Gaussian window (scikit-image: gaussian_weights=True)


def l1_reconstruction(x: jax.Array, x_rec: jax.Array) -> jax.Array:
  """`sum |x - x_rec|` over `[H, W, C]`, per example `[B]` (LDM sums, so `kl_weight` keeps its LDM meaning)."""
  chex.assert_equal_shape([x, x_rec])
  return jnp.sum(jnp.abs(x - x_rec), axis=(1, 2, 3))


def l2_reconstruction(x: jax.Array, x_rec: jax.Array) -> jax.Array:
  """`sum (x - x_rec)^2` over `[H, W, C]`, per example `[B]`."""
  chex.assert_equal_shape([x, x_rec])
  return jnp.sum(jnp.square(x - x_rec), axis=(1, 2, 3))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-0.5 * (r / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _blur_valid(x: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable depthwise Gaussian filter, 'valid' positions only: `[B, H, W, C] -> [B, H-k+1, W-k+1, C]`."""
  c = x.shape[-1]
  k = jnp.asarray(window, x.dtype)
  dn = ('NHWC', 'HWIO', 'NHWC')
  x = jax.lax.conv_general_dilated(
    x, jnp.tile(k[:, None, None, None], (1, 1, 1, c)), (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=c
  )
  return jax.lax.conv_general_dilated(
    x, jnp.tile(k[None, :, None, None], (1, 1, 1, c)), (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=c
  )


def ssim(
  x: jax.Array, y: jax.Array, *, data_range: float = 2.0, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> jax.Array:
  """Mean SSIM over valid positions and channels, per example `[B]` (Wang et al. 2004, eq. 13).

  Population (not sample) statistics under a Gaussian window, constants `K1 = 0.01`, `K2 = 0.03`; equal to
  `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=data_range, channel_axis=-1)`.
  """
  chex.assert_equal_shape([x, y])
  chex.assert_rank(x, 4)
  if min(x.shape[1:3]) < window:
    raise ValueError(f'ssim: images {x.shape[1]}x{x.shape[2]} are smaller than the {window}x{window} window.')
  w = _gaussian_window(window, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = _blur_valid(x, w), _blur_valid(y, w)
  vx = _blur_valid(x * x, w) - mx * mx
  vy = _blur_valid(y * y, w) - my * my
  cxy = _blur_valid(x * y, w) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def _avg_pool2(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def ssim_loss(x: jax.Array, x_rec: jax.Array, *, num_scales: int = 3, data_range: float = 2.0) -> jax.Array:
  """Multi-scale structure loss: the mean over a 2x average-pooled pyramid of `1 - SSIM`, per example `[B]`.

  Scales coarser than the 11x11 window are skipped, so 32 px images use two scales (32 and 16 px). This is an
  unweighted mean of single-scale SSIM losses, not the product-of-powers MS-SSIM of Wang et al. 2003.
  """
  losses = []
  for _ in range(num_scales):
    if min(x.shape[1:3]) < SSIM_WINDOW:
      break
    losses.append(1.0 - ssim(x, x_rec, data_range=data_range))
    x, x_rec = _avg_pool2(x), _avg_pool2(x_rec)
  if not losses:
    raise ValueError(f'ssim_loss: images {x.shape[1]}x{x.shape[2]} are smaller than the {SSIM_WINDOW}px window.')
  return sum(losses) / len(losses)


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """`0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))` over each example's patches, `[B]` (taming's
  `hinge_d_loss`)."""
  chex.assert_equal_shape([logits_real, logits_fake])
  axes = tuple(range(1, logits_real.ndim))
  return 0.5 * (
    jnp.mean(jax.nn.relu(1.0 - logits_real), axis=axes) + jnp.mean(jax.nn.relu(1.0 + logits_fake), axis=axes)
  )


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """`-mean D(x_rec)` over each example's patches, `[B]` (the generator side of the hinge GAN in taming/LDM)."""
  return -jnp.mean(logits_fake, axis=tuple(range(1, logits_fake.ndim)))


def adaptive_weight(
  nll_grad: jax.Array, gan_grad: jax.Array, *, disc_weight: float, eps: float = 1e-4, max_weight: float = 1e4
) -> jax.Array:
  """`lambda = disc_weight * clip(||grad nll|| / (||grad gan|| + eps), 0, max_weight)`, no gradient (Esser et al.
  2021, eq. 7).

  Args:
    nll_grad, gan_grad: gradients of the reconstruction loss and of the generator loss with respect to the
      decoder's last layer (`decoder.conv_out` kernel in taming/LDM).
  """
  chex.assert_equal_shape([nll_grad, gan_grad])
  ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + eps)
  return jax.lax.stop_gradient(disc_weight * jnp.clip(ratio, 0.0, max_weight))
