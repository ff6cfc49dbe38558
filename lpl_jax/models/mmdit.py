"""MMDiT (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024), NHWC.

Two token streams, image patches and context tokens, each with its own weights in every block (adaLN modulation
from the conditioning vector `c`, LayerNorm, qkv, optional QK RMSNorm, output projection, MLP), and one attention
over the concatenated sequence `[context; image]`: the streams exchange information only there. The block is
diffusers' `JointTransformerBlock` (SD3); `tests/models/test_mmdit.py` checks outputs against
`SD3Transformer2DModel` with the same weights.

The last block is "context pre-only", as in SD3: its context stream only contributes keys and values (adaLN with
shift and scale, LayerNorm, qkv) and has no output projection, MLP or gates, because nothing reads the context
tokens after it. Those weights would receive no gradient and only inflate the parameter count.

Conditioning, chosen by `context_dim` when the model is built:
  - class-conditional (`context_dim=None`): `c = t_emb + class_emb(y)` and the context is `num_class_tokens`
    learned tokens per class, from a second table. Both tables have `num_classes + 1` rows, the last being the null
    class for classifier-free guidance (the train step replaces labels; the model does no dropout).
    `model.apply(v, x, t, y)`.
  - text-conditional (`context_dim=D_text`): context tokens are precomputed text embeddings `[B, L, D_text]`
    projected to the width, and `c = t_emb + MLP(pooled)` when `pooled_dim` is set (SD3's pooled CLIP vector).
    `model.apply(v, x, t, context=ctx, pooled=pooled)`.

Modulation (`modulation`): `'block'` as in SD3, or `'single'`, PixArt-alpha's adaLN-single: one Linear of `c` for
the whole model and, per block and stream, a learned table added to it (a pre-only context stream takes the
attention's shift and scale). `lpl_jax.models.layers` describes both.

Positions: image tokens get the fixed 2D sin-cos embedding; context tokens get none. By default the positions of
a grid are its integer indices from 0, as in DiT. With `pos_embed_max_size` set, the embedding is SD3's: a fixed
table on a `pos_embed_max_size`^2 grid whose positions are spaced `pos_embed_base_size / pos_embed_max_size` apart,
of which every resolution takes the centre crop (diffusers' `PatchEmbed`; `lpl_jax.models.layers.cropped_pos_embed`).

Parameter counts of `MMDiT_paper` (28 blocks, width 1536, 24 heads of 64, patch 2, `jax.eval_shape`, any
resolution): class-conditional with one context token 2,359,377,424 (2.36B; QK-norm adds 7,168); text-conditional
with SD3's encoders (`context_dim=4096, pooled_dim=2048`) 2,368,103,440, exactly diffusers'
`SD3Transformer2DModel` of the same size. The LPL paper (section 4.1) reports 796M for "28 blocks with a hidden size
of 1,536". A two-stream block of width D holds 36 D^2 weights (per stream: adaLN 6 D^2, qkv 3 D^2, output D^2,
MLP 8 D^2), 84.9M at D = 1536, so 28 such blocks cannot total 796M. The paper's figure is close to
28 x 12 D^2 = 792.7M: one stream's attention and MLP weights per block and no per-block modulation Linear, which is
what a class-conditional model comes to with PixArt-alpha's adaLN-single (Chen et al. 2024, section 2.3;
`modulation='single'`, see `lpl_jax.models.layers`). Exact counts at that size with 1,000 classes (`jax.eval_shape`,
embedders and final layer included):

  architecture at 28 blocks x 1536                                          parameters     vs 796M
  two-stream MMDiT, a modulation Linear per block and stream (default)  2,359,377,424     +196.4%
  (a) two-stream MMDiT, adaLN-single (`modulation='single'`)            1,585,537,552      +99.2%
  (b) single-stream DiT, adaLN-single (`DiT(..., modulation='single')`)    811,880,464       +2.0%
  (c) MMDiT whose two streams share weights, adaLN-single: (b) plus the
      class-token table of the context stream (1001 x 1536)                813,418,000       +2.2%

(b) is the closest: 28 x (12 D^2 + 15 D) = 793,368,576 in the blocks (attention and MLP with their biases, and each
block's 6 x D table), 6 D^2 + 6 D = 14,164,992 in the shared modulation Linear, and 4,346,896 in the patch, timestep
and class embedders and the final layer. None is within 1% of 796M; the shared modulation Linear alone is 1.8% of it,
and (b) without it, 797,715,472, is 0.2% above it: the paper's figure is consistent with a count of the attention, MLP
and embedding weights that leaves the modulation out. The configs therefore keep this model with a modulation
Linear per block and stream, the architecture the paper names, and report its count as it is; adaLN-single is an
option of both denoisers (`model.modulation`).

References:
  Esser et al. 2024, section 4 and figure 2; diffusers `JointTransformerBlock` and `SD3Transformer2DModel`.
  Chen et al., "PixArt-alpha", ICLR 2024, section 2.3 (adaLN-single); diffusers `AdaLayerNormSingle` and the
  `scale_shift_table` of `PixArtTransformer2DModel`'s blocks.
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


class StreamLayers(nn.Module):
  """One stream's weights inside an MMDiT block; `pre` makes its queries, keys and values, `post` adds the
  attention output and the MLP to its residual stream. `pre_only` streams have no `post`."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qk_norm: bool
  pre_only: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  modulation: str = 'block'

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, heads = self.hidden_size, self.num_heads
    self.adaLN_modulation = L.block_modulation(self.modulation, 2 if self.pre_only else 6, d, **kw)
    self.norm1 = L.layer_norm(self.dtype)
    self.qkv = L.qkv_projection(heads, d // heads, **kw)
    if self.qk_norm:
      rms = lambda: nn.RMSNorm(
        epsilon=L.LN_EPS, **kw, scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.KV,))
      )
      self.q_norm, self.k_norm = rms(), rms()
    if not self.pre_only:
      self.proj = L.out_projection(d, **kw)
      self.norm2 = L.layer_norm(self.dtype)
      self.mlp = L.Mlp(int(d * self.mlp_ratio), **kw)

  def pre(self, x: jax.Array, c: jax.Array | list[jax.Array]) -> tuple[tuple[jax.Array, ...], list[jax.Array]]:
    """`x [B, L, D]`, `c [B, D]` (or the 6 shared modulation arrays, `modulation='single'`) -> (`q, k, v`, each
    `[B, L, heads, head_dim]`; the modulation vectors)."""
    mods = self.adaLN_modulation(c)
    q, k, v = jnp.unstack(self.qkv(L.modulate(self.norm1(x), mods[0], mods[1])), axis=2)
    if self.qk_norm:  # RMSNorm over each head's features (SD3 section 5.3.2, for stable bf16 training)
      q, k = self.q_norm(q), self.k_norm(k)
    return (q, k, v), mods

  def post(self, x: jax.Array, attn: jax.Array, mods: list[jax.Array]) -> jax.Array:
    """Gated residual updates of `x [B, L, D]` with the attention output `attn [B, L, heads, head_dim]`."""
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x = x + gate_msa[:, None] * self.proj(attn)
    return x + gate_mlp[:, None] * self.mlp(L.modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
  """Joint-attention block: `(x [B, N, D], ctx [B, T, D], c [B, D]) -> (x, ctx)`; `ctx` is `None` when
  `context_pre_only`. Identity on both streams at initialisation (zero adaLN gates). With `modulation='single'`,
  `c` is the model's 6 shared modulation arrays `[B, D]` and each stream adds its own table to them (small random
  gates at initialisation, as in PixArt-alpha)."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  context_pre_only: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  modulation: str = 'block'

  @nn.compact
  def __call__(
    self, x: jax.Array, ctx: jax.Array, c: jax.Array | list[jax.Array]
  ) -> tuple[jax.Array, jax.Array | None]:
    kw = dict(
      hidden_size=self.hidden_size,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      qk_norm=self.qk_norm,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      modulation=self.modulation,
    )
    image = StreamLayers(pre_only=False, name='image', **kw)
    context = StreamLayers(pre_only=self.context_pre_only, name='context', **kw)
    qkv_x, mods_x = image.pre(x, c)
    qkv_c, mods_c = context.pre(ctx, c)
    q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in zip(qkv_c, qkv_x))
    out = L.attention(q, k, v)
    n_ctx = ctx.shape[1]
    x = image.post(x, out[:, n_ctx:], mods_x)
    if self.context_pre_only:
      return x, None
    return x, context.post(ctx, out[:, :n_ctx], mods_c)


class MMDiT(nn.Module):
  """MMDiT denoiser on latents, class- or text-conditioned (see the module docstring).

  Attributes:
    patch_size: side of the square patches.
    hidden_size: model width D (both streams).
    depth: number of joint blocks (the last one context pre-only).
    num_heads: attention heads (D must be a multiple).
    mlp_ratio: MLP hidden width / D.
    in_channels: latent channels; the output has the same number.
    num_classes: class-conditional models: labels `0..num_classes-1`, `num_classes` = null class.
    num_class_tokens: class-conditional models: context tokens per class.
    context_dim: width of precomputed text embeddings; setting it makes the model text-conditional.
    pooled_dim: text-conditional models: width of the pooled text embedding, or None for none.
    qk_norm: RMSNorm on each head's queries and keys, per stream (SD3's option for bf16 stability).
    dtype: computation dtype; residual streams, LayerNorm/RMSNorm statistics and the attention softmax stay in at
      least float32; the output is at least float32.
    param_dtype: parameter dtype.
    remat: rematerialise each block (`nn.remat`).
    remat_policy: with `remat`, what a block keeps for the backward pass: one of `layers.REMAT_POLICIES` (`'full'`:
      nothing; see `lpl_jax.models.layers`).
    scan_layers: the first `depth - 1` blocks as one `nn.scan` over params stacked on a leading axis (`blocks`,
      logical axis `axes.LAYERS`), the last (context pre-only) block as `blocks_{depth-1}`: the same function,
      compiled once per block kind instead of `depth` times. `lpl_jax.models.scan` converts params between the
      layouts.
    modulation: `'block'` (SD3: a modulation Linear per block and stream) or `'single'` (PixArt-alpha's
      adaLN-single: one shared Linear, a learned table per block and stream; see the module docstring).
    pos_embed_max_size: None (positions 0, 1, ... of each grid) or SD3's: the side of the fixed positional table
      whose centre is cropped for every resolution; grids larger than it are refused.
    pos_embed_base_size: with `pos_embed_max_size`, the training grid side (SD3: `sample_size // patch_size`); the
      table's positions are `arange(pos_embed_max_size) * pos_embed_base_size / pos_embed_max_size`. None: equal to
      `pos_embed_max_size` (integer positions).
  """

  patch_size: int = 2
  hidden_size: int = 1536
  depth: int = 28
  num_heads: int = 24
  mlp_ratio: float = 4.0
  in_channels: int = 4
  num_classes: int = 1000
  num_class_tokens: int = 1
  context_dim: int | None = None
  pooled_dim: int | None = None
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  modulation: str = 'block'
  pos_embed_max_size: int | None = None
  pos_embed_base_size: int | None = None
  remat_policy: str = 'full'
  scan_layers: bool = False

  @property
  def scanned_depth(self) -> int:
    """Blocks in the scanned layout's stacked `blocks`: all but the last (context pre-only) one."""
    return self.depth - 1

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    *,
    context: jax.Array | None = None,
    pooled: jax.Array | None = None,
  ) -> jax.Array:
    """Denoiser output for noisy latents.

    Args:
      x: `[B, H, W, in_channels]` noisy latents; H and W multiples of `patch_size`.
      t: `[B]` (or scalar) timesteps, integer or float, used as given.
      y: class-conditional models only: `[B]` integer labels in `0..num_classes`.
      context: text-conditional models only: `[B, L, context_dim]` text embeddings.
      pooled: text-conditional models with `pooled_dim` only: `[B, pooled_dim]`.

    Returns:
      `[B, H, W, in_channels]`, at least float32.
    """
    L.check_latents('MMDiT', x, t, self.in_channels, self.patch_size)
    self._check_conditioning(x.shape[0], y, context, pooled)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = h // p, w // p
    residual = L.at_least_f32(self.dtype)

    tokens = L.dense(d, (axes.PATCH, axes.EMBED), name='x_embedder', **kw)(L.patchify(x, p))
    tokens = tokens.astype(residual) + self._pos_embed(gh, gw)
    cond = L.TimestepEmbedder(d, name='t_embedder', **kw)(jnp.broadcast_to(t, (b,)))
    if self.context_dim is None:
      cond = cond + L.class_table(self.num_classes + 1, d, name='y_embedder', **kw)(y)
      ctx = L.class_table(self.num_classes + 1, self.num_class_tokens * d, name='context_embedder', **kw)(y)
      ctx = ctx.reshape(b, self.num_class_tokens, d)
    else:
      ctx = L.dense(d, (axes.TEXT, axes.EMBED), name='context_embedder', **kw)(context)
      if self.pooled_dim is not None:
        hid = nn.silu(L.dense(d, (axes.TEXT, axes.MLP), name='pooled_embedder_fc1', **kw)(pooled))
        cond = cond + L.dense(d, (axes.MLP, axes.EMBED), name='pooled_embedder_fc2', **kw)(hid)
    ctx = ctx.astype(residual)
    block_cond = L.shared_modulation(self.modulation, cond, **kw)

    block_cls = scan.block_class(MMDiTBlock, remat=self.remat, policy=self.remat_policy, scanned=self.scan_layers)
    block_kw = dict(modulation=self.modulation, **kw)
    make_block = lambda name, last=False: block_cls(
      d, self.num_heads, self.mlp_ratio, self.qk_norm, context_pre_only=last, name=name, **block_kw
    )
    first = self.scanned_depth if self.scan_layers else 0  # the last block (context pre-only) is never scanned
    if first:
      step = lambda block, carry, cond: block(*map(L.constrain_tokens, carry), cond)
      tokens, ctx = scan.scan_blocks(step, make_block(scan.BLOCKS), (tokens, ctx), block_cond, length=first)
    for i in range(first, self.depth):
      tokens, ctx = L.constrain_tokens(tokens), L.constrain_tokens(ctx)
      tokens, ctx = make_block(f'blocks_{i}', last=i == self.depth - 1)(tokens, ctx, block_cond)
    tokens = L.constrain_tokens(tokens)
    out = L.FinalLayer(p * p * c, modulation=self.modulation, name='final_layer', **kw)(tokens, cond)
    out = L.unpatchify(out, p, gh, gw)
    return out.astype(L.at_least_f32(out.dtype))

  def _pos_embed(self, grid_h: int, grid_w: int):
    """`[grid_h * grid_w, D]` fixed positional embedding (see `pos_embed_max_size`)."""
    if self.pos_embed_max_size is None:
      return L.sincos_pos_embed_2d(self.hidden_size, grid_h, grid_w)
    base = self.pos_embed_max_size if self.pos_embed_base_size is None else self.pos_embed_base_size
    return L.cropped_pos_embed(self.hidden_size, grid_h, grid_w, self.pos_embed_max_size, base)

  def _check_conditioning(self, batch: int, y, context, pooled) -> None:
    L.check_modulation('MMDiT', self.modulation)
    if self.hidden_size % self.num_heads:
      raise ValueError(f'MMDiT: hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}.')
    if self.depth < 1:
      raise ValueError(f'MMDiT: depth must be at least 1, got {self.depth}.')
    if self.context_dim is None:
      if context is not None or pooled is not None:
        raise ValueError(
          'MMDiT: this model is class-conditional (context_dim=None) and takes labels y [B]; it was '
          'given context/pooled. Build it with context_dim (and pooled_dim) for text conditioning.'
        )
      if y is None:
        raise ValueError('MMDiT: this model is class-conditional (context_dim=None): pass class labels y [B].')
      L.check_labels('MMDiT', y, batch)
      return
    if y is not None:
      raise ValueError(
        f'MMDiT: this model is text-conditional (context_dim={self.context_dim}) and takes context '
        '[B, L, context_dim] (and pooled), not class labels y.'
      )
    if context is None:
      raise ValueError(f'MMDiT: this model is text-conditional: pass context [B, L, {self.context_dim}].')
    if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != self.context_dim:
      raise ValueError(
        f'MMDiT: context must be [B, L, context_dim] = [{batch}, L, {self.context_dim}], got {context.shape}.'
      )
    if self.pooled_dim is None and pooled is not None:
      raise ValueError('MMDiT: this model has no pooled conditioning (pooled_dim=None) but was given pooled.')
    if self.pooled_dim is not None:
      if pooled is None or pooled.shape != (batch, self.pooled_dim):
        got = 'none' if pooled is None else pooled.shape
        raise ValueError(
          f'MMDiT: pooled text embeddings must be [B, pooled_dim] = [{batch}, {self.pooled_dim}], got {got}.'
        )


# The LPL paper's denoiser (section 4.1): 28 blocks, width 1536, 24 heads of 64, patch size 2. See the module
# docstring for its parameter count.
MMDiT_paper = functools.partial(MMDiT, patch_size=2, hidden_size=1536, depth=28, num_heads=24)
