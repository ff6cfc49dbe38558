"""Figures for reports and notebooks: decoder feature maps with their outlier masks (the paper's Figure 13), loss
curves from `metrics.jsonl`, sample grids side by side. matplotlib, written as PNG."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from etils import epath
from PIL import Image

from lpl_jax import lpl as lpl_lib
from lpl_jax.autoencoder import AutoencoderKL

TAP_NAMES = ('mid', 'up_0', 'up_1', 'up_2', 'up_3', 'up_4', 'up_5')


def features_and_masks(model: AutoencoderKL, params, z_scaled: jax.Array, cfg: lpl_lib.LPLConfig):
  """The decoder taps LPL uses for scaled latents `z_scaled` `[B, h, w, C]`, with the keep-masks `lpl_loss` would
  give them (`lpl.layer_masks`; None for taps without one): `[(name, features [B, H, W, C], mask or None)]`, NumPy.
  """
  z = model.unscale_latents(z_scaled)
  feats = model.apply(
    {'params': params}, z, cfg.deepest_block, cfg.apply_post_quant_conv, method=model.decoder_features
  )
  used = [jnp.asarray(feats[i], jnp.float32) for i in cfg.used_layers]
  image_size = z_scaled.shape[1] * model.config.downsample_factor
  masks = lpl_lib.layer_masks(used, cfg, image_size)
  return [
    (TAP_NAMES[i] if i < len(TAP_NAMES) else f'tap_{i}', np.asarray(f), None if m is None else np.asarray(m))
    for i, f, m in zip(cfg.used_layers, used, masks, strict=True)
  ]


def feature_mask_figure(taps, path: str, *, image: np.ndarray | None = None, sample: int = 0) -> str:
  """One row per tap: the channel with the most masked positions (or the most active one) and its keep-mask."""
  rows = len(taps) + (image is not None)
  fig, axes = plt.subplots(rows, 2, figsize=(5, 2.4 * rows), squeeze=False)
  r = 0
  if image is not None:
    axes[0, 0].imshow(np.clip((np.asarray(image) + 1) / 2, 0, 1))
    axes[0, 0].set_title('input', fontsize=8)
    axes[0, 1].axis('off')
    r = 1
  for name, f, mask in taps:
    f = f[sample]
    if mask is not None:
      c = int(np.argmin(mask[sample].mean(axis=(0, 1))))
    else:
      c = int(np.argmax(np.abs(f).mean(axis=(0, 1))))
    axes[r, 0].imshow(f[..., c], cmap='magma')
    axes[r, 0].set_title(f'{name} {f.shape[0]}x{f.shape[1]}, channel {c}', fontsize=8)
    if mask is not None:
      axes[r, 1].imshow(mask[sample][..., c], cmap='gray', vmin=0, vmax=1)
      axes[r, 1].set_title(f'kept (white): {100 * mask[sample][..., c].mean():.1f}%', fontsize=8)
    else:
      axes[r, 1].text(0.5, 0.5, 'no outlier mask\non this layer', ha='center', va='center', fontsize=8)
    for a in axes[r]:
      a.set_xticks([])
      a.set_yticks([])
    r += 1
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def loss_curves_figure(runs: Mapping[str, str], path: str, keys: Sequence[str] = ('loss/diffusion', 'loss/lpl')) -> str:
  """`runs`: name -> metrics.jsonl. One panel per metric key, one line per run."""
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
  for name, file in runs.items():
    rows = read_metrics(file)
    for a, key in zip(axes[0], keys, strict=True):
      pts = [(r['step'], r[key]) for r in rows if key in r]
      if pts:
        steps, values = zip(*pts, strict=True)
        a.plot(steps, values, label=name, lw=1)
  for a, key in zip(axes[0], keys, strict=True):
    a.set_title(key)
    a.set_xlabel('step')
    a.set_yscale('log')
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> one `[rows * H, columns * W, C]` image (a square-ish grid by default)."""
  n, h, w, ch = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * h, columns * w, ch), np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
  return grid


def save_grid(images: np.ndarray, path: str, columns: int | None = None) -> str:
  """uint8 `[N, H, W, 3]` -> one PNG grid at `path`, a local or remote (`gs://`) path (folders created)."""
  png = io.BytesIO()
  Image.fromarray(image_grid(images, columns)).save(png, format='PNG')
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(png.getvalue())
  return path


def side_by_side(images: Mapping[str, np.ndarray], path: str, columns: int = 4) -> str:
  """Sample grids (uint8 `[N, H, W, 3]` per name) next to each other, with titles."""
  fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.6), squeeze=False)
  for a, (name, batch) in zip(axes[0], images.items(), strict=True):
    a.imshow(image_grid(batch, columns), interpolation='nearest')
    a.set_title(name, fontsize=9)
    a.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
