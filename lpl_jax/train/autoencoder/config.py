"""Settings of an autoencoder training run: one frozen dataclass, checked at construction, with a stable hash.

The hash covers every field that changes the trained weights or the exported folder; bookkeeping fields (logging,
checkpoint and export intervals) are left out, so changing them reuses a cached autoencoder. `from_config_dict`
reads the ml_collections form of the same settings (`configs/autoencoder.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lpl_jax import autoencoder as ae

if TYPE_CHECKING:
  import ml_collections

REC_LOSSES = ('l1', 'l2', 'l1+l2')
DTYPES = ('float32', 'bfloat16')
# Fields that change neither the weights nor the export.
_BOOKKEEPING = frozenset({'log_every', 'checkpoint_every', 'export_every', 'keep_checkpoints'})
# The config-file spelling of "the preset's value" for the architecture overrides: a ConfigDict field set to None has
# no type, so `--config.widths=32,64,128` could not be parsed; an empty or zero value of the right type can.
PRESET_VALUE = {'widths': (), 'layers_per_block': 0, 'latent_channels': 0}


@dataclasses.dataclass(frozen=True)
class AETrainConfig:
  """One autoencoder training run.

  Attributes:
    preset: base architecture (`lpl_jax.autoencoder.PRESETS`); `widths`, `layers_per_block` and `latent_channels`
      override its fields. The number of widths sets the downsampling factor `2 ** (len(widths) - 1)`: `tiny` has
      four levels (f8); `widths=(32, 64, 128)` is an f4 variant with 4x larger latents.
    resolution, batch_size, steps: square random crops (with flips) of the embedded photographs.
    num_samples: virtual length of the embedded source (defines an epoch, so the shuffle order).
    lr, b1, b2, weight_decay, warmup_steps: AdamW for the autoencoder (LDM: Adam with betas (0.5, 0.9)); the
      discriminator uses the same.
    rec_loss: 'l1' (LDM), 'l2' or 'l1+l2', summed over pixels per example as in LDM.
    kl_weight: weight of the KL term summed over latent elements (LDM: 1e-6).
    perceptual_weight: weight of the multi-scale SSIM structure loss (`losses.ssim_loss`), scaled by the number of
      pixel values so that it is on the same footing as the summed reconstruction loss (LDM adds its LPIPS value
      to every pixel's L1 before summing). 0 = off.
    disc_weight: the GAN term's factor in the adaptive weight (LDM: 0.5); 0 = no discriminator at all.
    disc_start: step from which the GAN terms are on (LDM: 50001).
    disc_width, disc_layers: the patch discriminator (taming: 64, 3).
    dtype: computation dtype of both networks (parameters and losses stay float32).
    seed: data order and crops, initialisation, posterior samples.
    scale_images: images whose posterior samples give `scaling_factor = 1 / std(z)`.
    eval_images: held-out crops (another seed, no flips) on which PSNR is measured.
  """

  preset: str = 'tiny'
  widths: tuple[int, ...] | None = None
  layers_per_block: int | None = None
  latent_channels: int | None = None
  resolution: int = 32
  batch_size: int = 16
  steps: int = 2000
  num_samples: int = 4096
  lr: float = 1e-3
  b1: float = 0.5
  b2: float = 0.9
  weight_decay: float = 0.0
  warmup_steps: int = 50
  rec_loss: str = 'l1'
  kl_weight: float = 1e-6
  perceptual_weight: float = 0.0
  disc_weight: float = 0.0
  disc_start: int = 0
  disc_width: int = 32
  disc_layers: int = 2
  dtype: str = 'float32'
  seed: int = 0
  scale_images: int = 256
  eval_images: int = 64
  log_every: int = 50
  checkpoint_every: int = 200
  export_every: int = 0
  keep_checkpoints: int = 2

  @classmethod
  def from_config_dict(cls, c: ml_collections.ConfigDict | Mapping[str, Any]) -> AETrainConfig:
    """The run that an `ml_collections.ConfigDict` (or a plain mapping) with exactly this class's fields describes.

    `widths=()`, `layers_per_block=0` and `latent_channels=0` stand for None (the preset's value), see
    `PRESET_VALUE`.

    Raises:
      ValueError: a field is unknown or missing, or a value is invalid (as at construction).
    """
    values = c.to_dict() if hasattr(c, 'to_dict') else dict(c)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if n not in values]
    if unknown or missing:
      problems = [
        f'{what} {", ".join(fields)}'
        for what, fields in (('unknown fields', unknown), ('missing fields', missing))
        if fields
      ]
      raise ValueError(f'the autoencoder config does not match AETrainConfig: {"; ".join(problems)}.')
    for name in PRESET_VALUE:
      if not values[name]:  # (), 0 (or None, from a plain mapping)
        values[name] = None
    return cls(**values)

  def __post_init__(self):
    if self.widths is not None:
      object.__setattr__(self, 'widths', tuple(int(w) for w in self.widths))
      if not self.widths or min(self.widths) < 1:
        raise ValueError(f"widths={self.widths}: expected at least one width, each >= 1 (None = the preset's).")
    for name in ('layers_per_block', 'latent_channels'):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} (None = the preset's).")
    if self.preset not in ae.PRESETS:
      raise ValueError(f'preset={self.preset!r}; known: {sorted(ae.PRESETS)}.')
    if self.rec_loss not in REC_LOSSES:
      raise ValueError(f'rec_loss={self.rec_loss!r}; expected one of {REC_LOSSES}.')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype={self.dtype!r}; expected one of {DTYPES}.')
    for name in (
      'resolution',
      'batch_size',
      'steps',
      'num_samples',
      'scale_images',
      'eval_images',
      'log_every',
      'checkpoint_every',
      'disc_width',
      'disc_layers',
      'keep_checkpoints',
    ):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}.')
    for name in (
      'kl_weight',
      'perceptual_weight',
      'disc_weight',
      'weight_decay',
      'warmup_steps',
      'disc_start',
      'export_every',
    ):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}.')
    if self.lr <= 0:
      raise ValueError(f'lr must be > 0, got {self.lr}.')
    f = self.autoencoder_config().downsample_factor
    if self.resolution % f:
      raise ValueError(
        f"resolution={self.resolution} is not a multiple of the autoencoder's downsampling factor "
        f'{f} ({len(self.autoencoder_config().block_out_channels)} levels).'
      )
    if self.perceptual_weight and self.resolution < 11:
      raise ValueError(
        f'perceptual_weight needs images of at least 11 px (the SSIM window); resolution={self.resolution}.'
      )
    if self.disc_weight and self.resolution < 2 ** (self.disc_layers + 2):
      raise ValueError(
        f'a discriminator with disc_layers={self.disc_layers} needs images of at least '
        f'{2 ** (self.disc_layers + 2)} px; resolution={self.resolution}.'
      )

  def autoencoder_config(self) -> ae.AutoencoderConfig:
    """The preset with this run's overrides (encoder and decoder share widths and depth, as in `AutoencoderKL`)."""
    base = ae.PRESETS[self.preset]
    if base.asymmetric:
      raise ValueError(f'preset {self.preset!r} is an AsymmetricAutoencoderKL; this trainer trains AutoencoderKL.')
    widths = self.widths or base.block_out_channels
    layers = self.layers_per_block or base.layers_per_block
    return dataclasses.replace(
      base,
      block_out_channels=widths,
      decoder_block_out_channels=widths,
      layers_per_block=layers,
      decoder_layers_per_block=layers,
      latent_channels=self.latent_channels or base.latent_channels,
      scaling_factor=1.0,
      shift_factor=0.0,
    )

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['widths'] = list(self.widths) if self.widths is not None else None
    return d

  def settings_hash(self) -> str:
    """sha256 of the fields that determine the trained weights (not logging or checkpoint intervals)."""
    d = {k: v for k, v in self.to_json().items() if k not in _BOOKKEEPING}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
