"""Shared building blocks: timestep and positional embeddings against NumPy transcriptions, patchify."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax.models import layers


def dit_timestep_embedding_np(t, dim, max_period=10000):
  """DiT `TimestepEmbedder.timestep_embedding`, in NumPy float64."""
  half = dim // 2
  freqs = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  if dim % 2:
    emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
  return emb


def mae_1d_np(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000**omega
  out = np.einsum('m,d->md', pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d_np(embed_dim, grid_h, grid_w):
  """MAE `get_2d_sincos_pos_embed` (used by DiT), generalised from a square grid to `grid_h x grid_w`."""
  grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
  emb_h = mae_1d_np(embed_dim // 2, grid[0])
  emb_w = mae_1d_np(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


@pytest.mark.parametrize('dim', [256, 64, 7])
def test_timestep_embedding_matches_dit_formula(dim):
  t = np.array([0, 1, 17, 250.5, 999, 0.37], np.float32)  # DDPM integers and continuous flow times
  got = jax.jit(layers.timestep_embedding, static_argnums=1)(jnp.asarray(t), dim)
  assert got.shape == (6, dim) and got.dtype == jnp.float32
  # float32 arguments t * f reach 999 rad: their rounding (~6e-8 relative) moves cos/sin by up to ~1e-4.
  np.testing.assert_allclose(got, dit_timestep_embedding_np(t, dim), atol=2e-4, rtol=0)
  ints = jax.jit(layers.timestep_embedding)(jnp.array([3, 500], jnp.int32))
  np.testing.assert_allclose(ints, dit_timestep_embedding_np([3, 500], 256), atol=1e-4, rtol=0)


@pytest.mark.parametrize('embed_dim, grid_h, grid_w', [(1152, 16, 16), (32, 4, 4), (64, 3, 5), (16, 6, 2)])
def test_pos_embed_matches_mae_formula(embed_dim, grid_h, grid_w):
  got = layers.sincos_pos_embed_2d(embed_dim, grid_h, grid_w)
  assert got.shape == (grid_h * grid_w, embed_dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, mae_2d_np(embed_dim, grid_h, grid_w), atol=1e-6, rtol=0)


def test_pos_embed_matches_diffusers():
  from diffusers.models.embeddings import get_2d_sincos_pos_embed

  ref = get_2d_sincos_pos_embed(48, 8, base_size=8, output_type='np')
  np.testing.assert_allclose(layers.sincos_pos_embed_2d(48, 8, 8), ref, atol=1e-6, rtol=0)


def test_pos_embed_rejects_width_not_divisible_by_4():
  with pytest.raises(ValueError, match='divisible by 4, got 30'):
    layers.sincos_pos_embed_2d(30, 2, 2)


@pytest.mark.parametrize('p', [1, 2, 4])
def test_patch_linear_equals_strided_conv(p):
  """A Linear on `patchify` output is the stride-p convolution whose kernel is the Linear's reshaped."""
  rng = np.random.default_rng(p)
  x, kernel = rng.standard_normal((2, 8, 12, 3), np.float32), rng.standard_normal((p, p, 3, 5), np.float32)
  conv = jax.lax.conv_general_dilated(x, kernel, (p, p), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  lin = layers.patchify(x, p) @ kernel.reshape(p * p * 3, 5)
  np.testing.assert_allclose(lin.reshape(conv.shape), conv, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(layers.unpatchify(layers.patchify(x, p), p, 8 // p, 12 // p), x)
