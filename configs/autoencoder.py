"""A KL autoencoder trained on the embedded photographs (LDM's recipe), for `python -m lpl_jax.train_autoencoder`.

  python -m lpl_jax.train_autoencoder --workdir=runs/ae                       # this file's default: tiny preset, f8
  python -m lpl_jax.train_autoencoder --config=configs/autoencoder.py:f4 --workdir=runs/ae4
  python -m lpl_jax.train_autoencoder --config=configs/autoencoder.py:gan --workdir=runs/ae_gan
  python -m lpl_jax.train_autoencoder --config=configs/autoencoder.py:f4 --cache=runs/ae_cache \\
      --config.steps=600                                                      # train once, print the export folder

Variants (comma-separated, e.g. `f4,gan`): none is the `tiny` preset (widths 32-64-128-128, f8: 4x4x4 latents at
32 px); `f4` has widths 32-64-128 (8x8x4 latents at 32 px, the demo's autoencoder); `gan` adds the multi-scale SSIM
structure loss and the patch discriminator from step 1000. Every field is `lpl_jax.train.autoencoder.AETrainConfig`'s
and can be overridden as `--config.<field>=<value>` (`--config.widths=32,64,128`). `widths=()`,
`layers_per_block=0` and `latent_channels=0` mean the preset's value.

From LDM (Rombach et al. 2022) and taming: L1 reconstruction summed over pixels, KL weight 1e-6, Adam betas (0.5, 0.9)
without weight decay, the adaptive GAN weight with factor 0.5. Chosen here for a 2-core CPU: 32 px crops, batch 16,
lr 1e-3 with 50 warmup steps, 2000 steps, a 2-layer discriminator of width 32 (taming: 3 layers, width 64), and the
SSIM structure loss instead of LPIPS (no pretrained network is downloaded). docs/autoencoder_training.md has the
recipe and measurements.
"""

import ml_collections

VARIANTS = ('', 'f4', 'gan', 'f4,gan')
_TOKENS = ('f4', 'gan')


def get_config(arg=None):
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  for token in tokens:
    if token not in _TOKENS:
      raise ValueError(f'unknown autoencoder config variant token {token!r} in {arg!r}; known: {", ".join(_TOKENS)}.')
  c = ml_collections.ConfigDict()
  # Architecture: a preset of lpl_jax.autoencoder.PRESETS; () / 0 keep the preset's widths, depth, latent channels.
  c.preset = 'tiny'
  c.widths = (32, 64, 128) if 'f4' in tokens else ()
  c.layers_per_block = 0
  c.latent_channels = 0
  # Data: random square crops (with flips) of the embedded photographs.
  c.resolution = 32
  c.batch_size = 16
  c.steps = 2000
  c.num_samples = 4096  # the source's virtual length: one epoch, one shuffle order
  # AdamW for the autoencoder and the discriminator.
  c.lr = 1e-3
  c.b1 = 0.5
  c.b2 = 0.9
  c.weight_decay = 0.0
  c.warmup_steps = 50
  # Losses: reconstruction summed over pixels, KL summed over latent elements (LDM's scale for kl_weight).
  c.rec_loss = 'l1'  # l1, l2 or l1+l2
  c.kl_weight = 1e-6
  c.perceptual_weight = 0.1 if 'gan' in tokens else 0.0  # SSIM structure loss; 0 = off
  c.disc_weight = 0.5 if 'gan' in tokens else 0.0  # factor of the adaptive GAN weight; 0 = no discriminator
  c.disc_start = 1000 if 'gan' in tokens else 0
  c.disc_width = 32
  c.disc_layers = 2
  c.dtype = 'float32'  # or bfloat16 (parameters and losses stay float32)
  c.seed = 0
  # Measurements of the export: the latent scaling factor and the held-out PSNR.
  c.scale_images = 256
  c.eval_images = 64
  # Bookkeeping (not in the settings hash): steps between logs, checkpoints, intermediate exports (0 = end only).
  c.log_every = 50
  c.checkpoint_every = 200
  c.export_every = 0
  c.keep_checkpoints = 2
  return c
