"""Architecture description of a KL autoencoder, read from a diffusers `config.json` or a preset.

One frozen dataclass covers diffusers' `AutoencoderKL` and `AsymmetricAutoencoderKL`: the asymmetric model is the
same encoder with a wider, deeper decoder (its own widths and depth) plus a mask-conditioning encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Keys of a diffusers config.json that describe nothing the Flax model needs (bookkeeping, tiling, fp16 upcasting).
_IGNORED_KEYS = frozenset({'force_upcast', 'sample_size', 'latents_mean', 'latents_std'})
_KL_KEYS = frozenset(
  {
    'in_channels',
    'out_channels',
    'down_block_types',
    'up_block_types',
    'block_out_channels',
    'layers_per_block',
    'act_fn',
    'latent_channels',
    'norm_num_groups',
    'scaling_factor',
    'shift_factor',
    'use_quant_conv',
    'use_post_quant_conv',
    'mid_block_add_attention',
  }
)
_ASYM_KEYS = frozenset(
  {
    'in_channels',
    'out_channels',
    'down_block_types',
    'down_block_out_channels',
    'layers_per_down_block',
    'up_block_types',
    'up_block_out_channels',
    'layers_per_up_block',
    'act_fn',
    'latent_channels',
    'norm_num_groups',
    'scaling_factor',
    # AsymmetricAutoencoderKL registers `block_out_channels` (= up_block_out_channels) into its saved config.
    'block_out_channels',
  }
)
KL_CLASS = 'AutoencoderKL'
ASYMMETRIC_CLASS = 'AsymmetricAutoencoderKL'


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Everything that shapes the network, plus the latent scaling used by diffusion models.

  Attributes:
    block_out_channels: encoder widths, one per resolution level, shallowest first.
    layers_per_block: ResNet blocks per encoder level (the decoder has `decoder_layers_per_block + 1` per level).
    decoder_block_out_channels: decoder widths (listed shallow-to-deep as in diffusers; the decoder runs them
      reversed). Equal to `block_out_channels` for `AutoencoderKL`.
    decoder_layers_per_block: see `layers_per_block`.
    latent_channels: channels of the latent `z`.
    norm_num_groups: GroupNorm groups everywhere.
    scaling_factor, shift_factor: diffusion models see `(z - shift_factor) * scaling_factor`.
    use_quant_conv, use_post_quant_conv: the 1x1 convolutions around the latent (absent in SD3/FLUX VAEs).
    mid_block_add_attention: whether the mid blocks have their self-attention layer.
    asymmetric: `AsymmetricAutoencoderKL` (decoder with a mask-conditioning encoder, Zhu et al. 2023).
  """

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  decoder_layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  asymmetric: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'block_out_channels', tuple(int(c) for c in self.block_out_channels))
    object.__setattr__(self, 'decoder_block_out_channels', tuple(int(c) for c in self.decoder_block_out_channels))
    for name in ('block_out_channels', 'decoder_block_out_channels'):
      widths = getattr(self, name)
      if not widths:
        raise ValueError(f'{name} is empty: an autoencoder needs at least one resolution level.')
      bad = [c for c in widths if c <= 0 or c % self.norm_num_groups]
      if bad:
        raise ValueError(
          f'{name}={widths}: every width must be a positive multiple of norm_num_groups='
          f'{self.norm_num_groups}; these are not: {bad}.'
        )
    if len(self.block_out_channels) != len(self.decoder_block_out_channels):
      raise ValueError(
        f'encoder has {len(self.block_out_channels)} levels but decoder has '
        f'{len(self.decoder_block_out_channels)}: they must downsample and upsample equally.'
      )
    for name in ('layers_per_block', 'decoder_layers_per_block', 'latent_channels', 'in_channels', 'out_channels'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}.')
    if self.scaling_factor == 0:
      raise ValueError('scaling_factor must be non-zero.')
    if not self.use_quant_conv and self.asymmetric:
      raise ValueError('AsymmetricAutoencoderKL always has quant convolutions.')

  @property
  def num_up_blocks(self) -> int:
    return len(self.decoder_block_out_channels)

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for the SD family)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def class_name(self) -> str:
    return ASYMMETRIC_CLASS if self.asymmetric else KL_CLASS

  @classmethod
  def from_diffusers_config(cls, cfg: Mapping[str, Any]) -> AutoencoderConfig:
    """Builds the config from the dict of a diffusers `config.json`; unknown or unsupported settings raise."""
    class_name = cfg.get('_class_name', KL_CLASS)
    if class_name not in (KL_CLASS, ASYMMETRIC_CLASS):
      raise ValueError(f'config.json describes a {class_name!r}; supported: {KL_CLASS!r}, {ASYMMETRIC_CLASS!r}.')
    asymmetric = class_name == ASYMMETRIC_CLASS
    known = _ASYM_KEYS if asymmetric else _KL_KEYS
    unknown = sorted(k for k in cfg if not k.startswith('_') and k not in known and k not in _IGNORED_KEYS)
    if unknown:
      raise ValueError(
        f'config.json of {class_name} has keys this implementation does not know: {unknown}. '
        'Refusing to guess the architecture.'
      )
    act = cfg.get('act_fn', 'silu')
    if act != 'silu':
      raise ValueError(f'act_fn={act!r} is not supported; only "silu" (every published KL autoencoder uses it).')
    for key, expected in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
      bad = [t for t in cfg.get(key, ()) if t != expected]
      if bad:
        raise ValueError(f'{key} contains {bad}; only {expected!r} blocks are supported.')

    # Defaults are diffusers' constructor defaults, so a sparse config.json means what it means there.
    if asymmetric:
      enc, dec = tuple(cfg.get('down_block_out_channels', (64,))), tuple(cfg.get('up_block_out_channels', (64,)))
      enc_layers, dec_layers = cfg.get('layers_per_down_block', 1), cfg.get('layers_per_up_block', 1)
    else:
      enc = dec = tuple(cfg.get('block_out_channels', (64,)))
      enc_layers = dec_layers = cfg.get('layers_per_block', 1)
    for key, widths in (('down_block_types', enc), ('up_block_types', dec)):
      if key in cfg and len(cfg[key]) != len(widths):
        raise ValueError(f'config.json lists {len(cfg[key])} {key} but {len(widths)} block widths.')
    shift = cfg.get('shift_factor')
    return cls(
      block_out_channels=enc,
      layers_per_block=int(enc_layers),
      decoder_block_out_channels=dec,
      decoder_layers_per_block=int(dec_layers),
      latent_channels=int(cfg.get('latent_channels', 4)),
      in_channels=int(cfg.get('in_channels', 3)),
      out_channels=int(cfg.get('out_channels', 3)),
      norm_num_groups=int(cfg.get('norm_num_groups', 32)),
      scaling_factor=float(cfg.get('scaling_factor', 0.18215)),
      shift_factor=0.0 if shift is None else float(shift),
      use_quant_conv=bool(cfg.get('use_quant_conv', True)),
      use_post_quant_conv=bool(cfg.get('use_post_quant_conv', True)),
      mid_block_add_attention=bool(cfg.get('mid_block_add_attention', True)),
      asymmetric=asymmetric,
    )

  def to_diffusers_config(self) -> dict[str, Any]:
    """The `config.json` dict diffusers would write for this architecture (used to export weights)."""
    n = len(self.block_out_channels)
    common = dict(
      _class_name=self.class_name,
      in_channels=self.in_channels,
      out_channels=self.out_channels,
      down_block_types=['DownEncoderBlock2D'] * n,
      up_block_types=['UpDecoderBlock2D'] * n,
      act_fn='silu',
      latent_channels=self.latent_channels,
      norm_num_groups=self.norm_num_groups,
      scaling_factor=self.scaling_factor,
    )
    if self.asymmetric:
      return dict(
        common,
        down_block_out_channels=list(self.block_out_channels),
        layers_per_down_block=self.layers_per_block,
        up_block_out_channels=list(self.decoder_block_out_channels),
        layers_per_up_block=self.decoder_layers_per_block,
      )
    if self.decoder_block_out_channels != self.block_out_channels or (
      self.decoder_layers_per_block != self.layers_per_block
    ):
      raise ValueError(
        'AutoencoderKL has one set of widths and depth for encoder and decoder; this config '
        'differs between them, so it is not expressible as a diffusers AutoencoderKL.'
      )
    return dict(
      common,
      block_out_channels=list(self.block_out_channels),
      layers_per_block=self.layers_per_block,
      shift_factor=self.shift_factor or None,
      use_quant_conv=self.use_quant_conv,
      use_post_quant_conv=self.use_post_quant_conv,
      mid_block_add_attention=self.mid_block_add_attention,
    )
