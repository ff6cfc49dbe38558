"""DiT with adaLN-Zero (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023), NHWC.

`model.apply({'params': p}, x [B, H, W, C], t [B], y [B]) -> [B, H, W, C]`. The architecture is the official one
(`facebookresearch/DiT`, `models.py`). With `learn_sigma=False` the output has as many channels as the input; with
`learn_sigma=True` (the public checkpoints) it has twice as many, in the official order: the C channels of the
prediction (eps), then the C values `v` in [-1, 1] that interpolate the log-variance between the DDPM posterior's
and beta_t (Nichol & Dhariwal 2021, Eq. 15); `lpl_jax.diffusion.Formulation(learn_sigma=True)` reads them.
Parameter layout differs from the PyTorch one only in shape, not in content: the patch-embedding convolution is a
Linear on flattened patches (its `[p*p*C, D]` kernel is the conv kernel `[p, p, C, D]` reshaped), and the attention
kernels are kept per head (`[D, 3, heads, head_dim]`, `[heads, head_dim, D]`) for sharding.

Parameter counts (`jax.eval_shape`, any resolution): DiT-XL/2 has 674,816,272 parameters. The published 675,129,632
(DiT's training log) also counts the fixed positional embedding (256 x 1152 = 294,912 values that the official code
stores as a frozen `nn.Parameter`; here it is a constant) and the learned-sigma half of the output projection
(1152 x 16 + 16 = 18,448, present here with `learn_sigma=True`): 674,816,272 + 294,912 + 18,448 = 675,129,632.

With `modulation='single'` (PixArt-alpha's adaLN-single, Chen et al. 2024, section 2.3: one modulation Linear
shared by the blocks, a learned `[6, D]` table per block) at the LPL paper's size, 28 blocks of width 1536 with 24
heads, patch 2 and 1,000 classes, the model has 811,880,464 parameters, the closest of the candidates that
`lpl_jax.models.mmdit`'s docstring compares with the paper's 796M.

The timestep is used as given: DiT's DDPM timesteps are 0..999; a flow formulation with t in [0, 1] should scale
it (x1000, as SD3 does) so that the 256 sinusoidal features resolve it.

References:
  Peebles & Xie 2023, section 3.2 (adaLN-Zero) and table 1 (model sizes); DiT `models.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lpl_jax.models import axes, scan
from lpl_jax.models import layers as L

Dtype = Any


class DiTBlock(nn.Module):
  """adaLN-Zero block: `x + gate_msa * Attn(modulate(LN(x)))`, then `x + gate_mlp * MLP(modulate(LN(x)))`.

  The six modulation vectors come from `c` through a zero-initialised Linear, so at initialisation every gate is 0
  and the block is the identity. With `modulation='single'` they are the model's shared vectors plus the block's
  learned table (adaLN-single, `layers.ModulationTable`; small random gates at initialisation, as in PixArt-alpha).
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  modulation: str = 'block'

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array | list[jax.Array]) -> jax.Array:
    """`x [B, L, D]` (residual stream, at least float32), `c [B, D]` -> `[B, L, D]`. With `modulation='single'`,
    `c` is the model's 6 shared modulation arrays `[B, D]` (`layers.shared_modulation`), to which the block adds
    its table."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, heads = self.hidden_size, self.num_heads
    adaln = L.block_modulation(self.modulation, 6, d, **kw)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln(c)
    h = L.modulate(L.layer_norm(self.dtype, name='norm1')(x), shift_msa, scale_msa)
    q, k, v = jnp.unstack(L.qkv_projection(heads, d // heads, name='qkv', **kw)(h), axis=2)
    attn = L.out_projection(d, name='proj', **kw)(L.attention(q, k, v))
    x = x + gate_msa[:, None] * attn
    h = L.modulate(L.layer_norm(self.dtype, name='norm2')(x), shift_mlp, scale_mlp)
    return x + gate_mlp[:, None] * L.Mlp(int(d * self.mlp_ratio), name='mlp', **kw)(h)


class DiT(nn.Module):
  """Class-conditional DiT denoiser on latents.

  Attributes:
    patch_size: side of the square patches (2, 4 or 8 in the paper).
    hidden_size: model width D.
    depth: number of DiT blocks.
    num_heads: attention heads (D must be a multiple).
    mlp_ratio: MLP hidden width / D.
    in_channels: latent channels; the output has the same number, or twice as many with `learn_sigma`.
    num_classes: class labels are `0..num_classes-1`; label `num_classes` is the null class (its own row of the
      table) for classifier-free guidance. The model does no label dropout: the train step replaces labels.
    dtype: computation dtype (`jnp.bfloat16` for bf16 compute). The residual stream, LayerNorm statistics and the
      attention softmax stay in at least float32; the output is at least float32.
    param_dtype: parameter dtype.
    remat: rematerialise each block (`nn.remat`) so the backward pass keeps only block boundaries and what
      `remat_policy` saves.
    remat_policy: with `remat`, what a block keeps for the backward pass: one of `layers.REMAT_POLICIES` (`'full'`:
      nothing; see `lpl_jax.models.layers`).
    scan_layers: the blocks as one `nn.scan` over params stacked on a leading axis (`blocks`, logical axis
      `axes.LAYERS`) instead of `depth` subtrees `blocks_i`: the same function, compiled once per block instead of
      `depth` times. `lpl_jax.models.scan` converts params between the two layouts.
    modulation: `'block'` (DiT's adaLN-Zero, a modulation Linear per block) or `'single'` (PixArt-alpha's
      adaLN-single: one shared Linear, a learned table per block; see the module docstring).
    learn_sigma: also predict the variance interpolation `v` (improved DDPM), as the public DiT checkpoints do:
      the output is `[B, H, W, 2 * in_channels]`, the prediction first.
  """

  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  in_channels: int = 4
  num_classes: int = 1000
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  modulation: str = 'block'
  learn_sigma: bool = False
  remat_policy: str = 'full'
  scan_layers: bool = False

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def scanned_depth(self) -> int:
    """Blocks in the scanned layout's stacked `blocks` (all of them)."""
    return self.depth

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """Denoiser output for noisy latents.

    Args:
      x: `[B, H, W, in_channels]` noisy latents; H and W multiples of `patch_size`.
      t: `[B]` (or scalar) timesteps, integer or float.
      y: `[B]` integer class labels in `0..num_classes` (`num_classes` = null class).

    Returns:
      `[B, H, W, out_channels]`, at least float32.
    """
    L.check_latents('DiT', x, t, self.in_channels, self.patch_size)
    L.check_labels('DiT', y, x.shape[0])
    L.check_modulation('DiT', self.modulation)
    if self.hidden_size % self.num_heads:
      raise ValueError(f'DiT: hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p

    tokens = L.dense(d, (axes.PATCH, axes.EMBED), name='x_embedder', **kw)(L.patchify(x, p))
    tokens = tokens.astype(L.at_least_f32(self.dtype)) + L.sincos_pos_embed_2d(d, gh, gw)
    cond = L.TimestepEmbedder(d, name='t_embedder', **kw)(jnp.broadcast_to(t, (b,)))
    cond = cond + L.class_table(self.num_classes + 1, d, name='y_embedder', **kw)(y)
    block_cond = L.shared_modulation(self.modulation, cond, **kw)

    block_cls = scan.block_class(DiTBlock, remat=self.remat, policy=self.remat_policy, scanned=self.scan_layers)
    make_block = lambda name: block_cls(d, self.num_heads, self.mlp_ratio, modulation=self.modulation, name=name, **kw)
    tokens = L.constrain_tokens(tokens)
    if self.scan_layers:
      step = lambda block, x, cond: L.constrain_tokens(block(x, cond))
      tokens = scan.scan_blocks(step, make_block(scan.BLOCKS), tokens, block_cond, length=self.depth)
    for i in range(0 if self.scan_layers else self.depth):
      tokens = L.constrain_tokens(make_block(f'blocks_{i}')(tokens, block_cond))
    out = L.FinalLayer(p * p * self.out_channels, modulation=self.modulation, name='final_layer', **kw)(tokens, cond)
    out = L.unpatchify(out, p, gh, gw)
    return out.astype(L.at_least_f32(out.dtype))


def from_pytorch_checkpoint(
  path, *, model: DiT | None = None, num_heads: int | None = None, **kwargs
) -> tuple[DiT, dict]:
  """`(model, params)` from a facebookresearch/DiT `.pt` file (e.g. `DiT-XL-2-256x256.pt`); torch is needed.
  See `lpl_jax.models.convert_dit.from_pytorch_checkpoint` (imported here lazily: it imports this module)."""
  from lpl_jax.models import convert_dit

  return convert_dit.from_pytorch_checkpoint(path, model=model, num_heads=num_heads, **kwargs)


# Table 1 of the paper: (depth, hidden size, heads).
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}


def dit_by_size(size: str, patch_size: int, **kwargs) -> DiT:
  """`DiT-{size}/{patch_size}`, e.g. `dit_by_size('XL', 2, dtype=jnp.bfloat16)`."""
  if size not in SIZES:
    raise ValueError(f'unknown DiT size {size!r}; expected one of {sorted(SIZES)}.')
  depth, hidden, heads = SIZES[size]
  return DiT(patch_size=patch_size, hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)


DiT_S_2 = functools.partial(dit_by_size, 'S', 2)
DiT_S_4 = functools.partial(dit_by_size, 'S', 4)
DiT_S_8 = functools.partial(dit_by_size, 'S', 8)
DiT_B_2 = functools.partial(dit_by_size, 'B', 2)
DiT_B_4 = functools.partial(dit_by_size, 'B', 4)
DiT_B_8 = functools.partial(dit_by_size, 'B', 8)
DiT_L_2 = functools.partial(dit_by_size, 'L', 2)
DiT_L_4 = functools.partial(dit_by_size, 'L', 4)
DiT_L_8 = functools.partial(dit_by_size, 'L', 8)
DiT_XL_2 = functools.partial(dit_by_size, 'XL', 2)
DiT_XL_4 = functools.partial(dit_by_size, 'XL', 4)
DiT_XL_8 = functools.partial(dit_by_size, 'XL', 8)
