"""Denoisers on latents: DiT (adaLN-Zero) and MMDiT (joint attention), NHWC, with logically named parameters; their
blocks unrolled or one `nn.scan` (`scan` converts params between the two layouts)."""

from lpl_jax.models import axes, scan
from lpl_jax.models.convert import dit_from_pytorch_checkpoint, from_diffusers, save_diffusers
from lpl_jax.models.dit import (
  DiT,
  DiT_B_2,
  DiT_B_4,
  DiT_B_8,
  DiT_L_2,
  DiT_L_4,
  DiT_L_8,
  DiT_S_2,
  DiT_S_4,
  DiT_S_8,
  DiT_XL_2,
  DiT_XL_4,
  DiT_XL_8,
  DiTBlock,
  dit_by_size,
)
from lpl_jax.models.layers import sincos_pos_embed_2d, timestep_embedding
from lpl_jax.models.mmdit import MMDiT, MMDiT_paper, MMDiTBlock

__all__ = [
  'DiT',
  'DiTBlock',
  'DiT_B_2',
  'DiT_B_4',
  'DiT_B_8',
  'DiT_L_2',
  'DiT_L_4',
  'DiT_L_8',
  'DiT_S_2',
  'DiT_S_4',
  'DiT_S_8',
  'DiT_XL_2',
  'DiT_XL_4',
  'DiT_XL_8',
  'MMDiT',
  'MMDiTBlock',
  'MMDiT_paper',
  'axes',
  'dit_by_size',
  'dit_from_pytorch_checkpoint',
  'from_diffusers',
  'save_diffusers',
  'scan',
  'sincos_pos_embed_2d',
  'timestep_embedding',
]
