"""`python -m lpl_jax.train_autoencoder`: trains a KL autoencoder on the embedded photographs (LDM's recipe) and
exports it as a diffusers-format folder, with the latent `scaling_factor` measured on the data.

  python -m lpl_jax.train_autoencoder --workdir=runs/ae                       # resumes if runs/ae has checkpoints
  python -m lpl_jax.train_autoencoder --cache=runs/ae_cache --steps=600       # train once, reuse afterwards
  python -m lpl_jax.train_autoencoder --workdir=runs/ae4 --widths=32,64,128   # f4: 8x8 latents at 32 px
  python -m lpl_jax.train_autoencoder --workdir=runs/ae_gan --perceptual_weight=0.1 --disc_weight=0.5 \
      --disc_start=1000

The export (`<workdir>/export/`, or `--export`) loads with `lpl_jax.autoencoder.from_diffusers` and with diffusers'
`AutoencoderKL.from_pretrained`. See docs/autoencoder_training.md.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags

from lpl_jax.aetrain import AETrainConfig, NonFiniteLossError, ensure_autoencoder, train

_D = AETrainConfig()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics.jsonl, export/.')
_CACHE = flags.DEFINE_string('cache', None, 'Instead of --workdir: a cache folder; trains into <cache>/ae-<settings '
                             'hash>/ unless that already holds a finished export, and prints the export folder.')
_EXPORT = flags.DEFINE_string('export', None, 'Export folder (default <workdir>/export); not with --cache.')
_PRESET = flags.DEFINE_string('preset', _D.preset, 'Base architecture (lpl_jax.autoencoder.PRESETS).')
_WIDTHS = flags.DEFINE_list('widths', None, 'Block widths overriding the preset; their number sets the '
                            'downsampling factor 2^(n-1) (e.g. 32,64,128 for f4).')
_LAYERS = flags.DEFINE_integer('layers_per_block', None, 'ResNet layers per level, overriding the preset.')
_LATENT = flags.DEFINE_integer('latent_channels', None, 'Latent channels, overriding the preset.')
_RESOLUTION = flags.DEFINE_integer('resolution', _D.resolution, 'Training crop side in pixels.')
_BATCH = flags.DEFINE_integer('batch_size', _D.batch_size, 'Images per step.')
_STEPS = flags.DEFINE_integer('steps', _D.steps, 'Training steps.')
_LR = flags.DEFINE_float('lr', _D.lr, 'AdamW learning rate (autoencoder and discriminator).')
_WARMUP = flags.DEFINE_integer('warmup_steps', _D.warmup_steps, 'Linear learning-rate warmup steps.')
_REC = flags.DEFINE_enum('rec_loss', _D.rec_loss, ['l1', 'l2', 'l1+l2'], 'Pixel reconstruction loss.')
_KL = flags.DEFINE_float('kl_weight', _D.kl_weight, 'Weight of the KL term (LDM: 1e-6).')
_PERCEPTUAL = flags.DEFINE_float('perceptual_weight', _D.perceptual_weight,
                                 'Weight of the multi-scale SSIM structure loss (not LPIPS: no pretrained network).')
_DISC = flags.DEFINE_float('disc_weight', _D.disc_weight, 'Patch-GAN factor of the adaptive weight (LDM: 0.5); 0 = '
                           'no discriminator.')
_DISC_START = flags.DEFINE_integer('disc_start', _D.disc_start, 'Step from which the GAN terms are on.')
_DTYPE = flags.DEFINE_enum('dtype', _D.dtype, ['float32', 'bfloat16'], 'Computation dtype.')
_SEED = flags.DEFINE_integer('seed', _D.seed, 'Seed of data order, crops, initialisation and posterior samples.')
_LOG_EVERY = flags.DEFINE_integer('log_every', _D.log_every, 'Steps between logged metrics.')
_CKPT_EVERY = flags.DEFINE_integer('checkpoint_every', _D.checkpoint_every, 'Steps between checkpoints.')
_EXPORT_EVERY = flags.DEFINE_integer('export_every', _D.export_every, 'Steps between intermediate exports (0 = end '
                                     'only).')


def settings_from_flags() -> dict:
  return dict(preset=_PRESET.value, widths=tuple(int(w) for w in _WIDTHS.value) if _WIDTHS.value else None,
              layers_per_block=_LAYERS.value, latent_channels=_LATENT.value, resolution=_RESOLUTION.value,
              batch_size=_BATCH.value, steps=_STEPS.value, lr=_LR.value, warmup_steps=_WARMUP.value,
              rec_loss=_REC.value, kl_weight=_KL.value, perceptual_weight=_PERCEPTUAL.value,
              disc_weight=_DISC.value, disc_start=_DISC_START.value, dtype=_DTYPE.value, seed=_SEED.value,
              log_every=_LOG_EVERY.value, checkpoint_every=_CKPT_EVERY.value, export_every=_EXPORT_EVERY.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if (_WORKDIR.value is None) == (_CACHE.value is None):
    raise app.UsageError('give exactly one of --workdir and --cache.')
  if _CACHE.value and _EXPORT.value:
    raise app.UsageError('--export goes with --workdir; with --cache the export is <cache>/ae-<hash>/export.')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax logs every save step at INFO through absl
  try:
    settings = settings_from_flags()
    if _CACHE.value:
      print(ensure_autoencoder(_CACHE.value, **settings))
      return
    info = train(AETrainConfig(**settings), _WORKDIR.value, export_dir=_EXPORT.value)
  except (ValueError, NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: info[k] for k in ('step', 'scaling_factor', 'heldout_psnr', 'train_seconds')}))


if __name__ == '__main__':
  app.run(main)
