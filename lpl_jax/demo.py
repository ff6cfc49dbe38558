"""`make demo`: one photograph through the 'tiny' autoencoder, and the decoder feature taps the LPL compares.

Until the training system exists this is what the demo shows: a photograph shipped inside scikit-image (no network)
is encoded to its posterior mean, decoded, and the decoder's features `[mid, up_0, ..., up_3]` are drawn. The
autoencoder has random weights, so the reconstruction is not meaningful yet.

Usage:
  python -m lpl_jax.demo --workdir=runs/demo [--seed=0]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from lpl_jax import autoencoder as ae

PRESET = 'tiny'
IMAGE_SIZE = 128
CHANNELS_SHOWN = 4


def load_photo(size: int = IMAGE_SIZE) -> np.ndarray:
  """scikit-image's astronaut photograph, centre-cropped and resized: `[1, size, size, 3]` float32 in [-1, 1]."""
  photo = skimage.data.astronaut()  # read from the installed package, no download
  h, w = photo.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.LANCZOS)
  return (np.asarray(crop, np.float32) / 127.5 - 1.0)[None]


def to_uint8(image: np.ndarray) -> np.ndarray:
  """`[H, W, 3]` in [-1, 1] (values outside are clipped) -> uint8."""
  return np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_features_figure(path: str, features: list[np.ndarray]) -> None:
  """One row per feature tap, the first `CHANNELS_SHOWN` channels of the first example, each min-max scaled."""
  names = ['mid'] + [f'up_{i}' for i in range(len(features) - 1)]
  fig = Figure(figsize=(2.2 * CHANNELS_SHOWN, 2.3 * len(features)), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(features), CHANNELS_SHOWN, squeeze=False)
  for row, (name, feat) in enumerate(zip(names, features, strict=True)):
    for col in range(CHANNELS_SHOWN):
      ax = axes[row, col]
      ax.imshow(feat[0, :, :, col], cmap='viridis', interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f'{name} {list(feat.shape)}\nchannel {col}' if col == 0 else f'channel {col}', fontsize=8)
  fig.suptitle(f"Decoder feature taps of the '{PRESET}' autoencoder (RANDOM weights)", fontsize=10)
  fig.savefig(path, dpi=100)


def run(workdir: str, seed: int = 0) -> dict[str, Any]:
  """Encodes, decodes and extracts decoder features of one photograph; writes two PNGs into `workdir`.

  Args:
    workdir: output folder (created if missing).
    seed: PRNG seed of the autoencoder's random parameters.

  Returns:
    `reconstruction` and `decoder_features` (paths of the PNGs written), `image_shape`, `latent_shape` and
    `feature_shapes` (`[mid, up_0, ..., up_3]`, each `(B, H, W, C)`).
  """
  os.makedirs(workdir, exist_ok=True)
  x = jnp.asarray(load_photo())
  model = ae.from_preset(PRESET)
  params = jax.jit(lambda key: ae.init_params(model, key))(jax.random.key(seed))

  @jax.jit
  def forward(params, x):
    mean, _ = model.apply({'params': params}, x, method=model.encode)
    recon = model.apply({'params': params}, mean, method=model.decode)
    return mean, recon, model.apply({'params': params}, mean, method=model.decoder_features)

  mean, recon, feats = jax.device_get(forward(params, x))
  paths = {name: os.path.join(workdir, f'{name}.png') for name in ('reconstruction', 'decoder_features')}
  Image.fromarray(np.concatenate([to_uint8(x[0]), to_uint8(recon[0])], axis=1)).save(paths['reconstruction'])
  save_features_figure(paths['decoder_features'], feats)
  return dict(paths, image_shape=tuple(x.shape), latent_shape=tuple(mean.shape),
              feature_shapes=[tuple(f.shape) for f in feats])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='runs/demo', help='where the PNGs are written')
  parser.add_argument('--seed', type=int, default=0, help='PRNG seed of the random autoencoder parameters')
  args = parser.parse_args(argv)

  print(f"lpl-jax demo: scikit-image's astronaut photograph ({IMAGE_SIZE}x{IMAGE_SIZE}, centre-cropped) through the "
        f"'{PRESET}' KL autoencoder on {jax.devices()[0].platform}.")
  print(f'NOTE: the autoencoder has RANDOM weights (seed {args.seed}); no pretrained weights are downloaded. A trained '
        'autoencoder for the embedded data comes later, so the reconstruction below is not meaningful yet.')
  out = run(args.workdir, args.seed)
  names = ['mid'] + [f'up_{i}' for i in range(len(out['feature_shapes']) - 1)]
  print(f"image {out['image_shape']} -> encode (posterior mean) -> latent {out['latent_shape']} -> decode; "
        'decoder features of the latent:')
  for name, shape in zip(names, out['feature_shapes'], strict=True):
    print(f'  {name:<5} {shape}')
  print('Wrote:')
  print(f"  {out['reconstruction']}  (input | reconstruction)")
  print(f"  {out['decoder_features']}  (first {CHANNELS_SHOWN} channels of each feature tap)")


if __name__ == '__main__':
  main(sys.argv[1:])
