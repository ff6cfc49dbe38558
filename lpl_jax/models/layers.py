"""Building blocks shared by DiT and MMDiT: embeddings, adaLN modulation, attention, MLP, patchify, input checks.

Parameters are kept in `param_dtype` and carry logical axis names (`lpl_jax.models.axes`); computation runs in
`dtype`, with LayerNorm statistics, attention logits and softmax in at least float32. Initialisation follows DiT
(Peebles & Xie 2023, `models.py::initialize_weights`): Xavier-uniform kernels and zero biases, N(0, 0.02) for the
timestep MLP and the class table, zeros for every adaLN modulation and for the final projection (adaLN-Zero).

Modulation, one of `MODULATIONS` (the models' `modulation` attribute):
  - `'block'`: every block (and every MMDiT stream) computes its shift/scale/gate vectors from the conditioning `c`
    with its own SiLU + Linear `D -> 6D` (DiT's adaLN-Zero, SD3's blocks): 6 D^2 weights per block and stream.
  - `'single'`: adaLN-single (Chen et al., "PixArt-alpha", ICLR 2024, section 2.3): one SiLU + Linear `D -> 6D` of
    `c` for the whole model, and per block only a learned table `[6, D]` added to its output; the final layer adds a
    `[2, D]` table to `c` itself. Initialised as PixArt-alpha's code does: tables `randn(n, D) / sqrt(D)`, the shared
    Linear N(0, 0.02) with zero bias. The blocks are then not the identity at initialisation (their gates are the
    tables' small random values); the model's output still is 0 (zero final projection).

Rematerialisation (the models' `remat` and `remat_policy`; `remat_policy(name)` gives the `jax.checkpoint` policy), one
of `REMAT_POLICIES`: what a rematerialised block keeps from its forward pass for the backward pass, everything else
being recomputed there:
  - `'full'`: nothing but the block's inputs (the least memory; the forward pass runs twice).
  - `'dots_saveable'`: the results of every matrix product (`jax.checkpoint_policies.dots_saveable`): the linear
    layers' outputs and the attention logits and outputs; only the elementwise work (norms, GELU, softmax, adaLN) is
    recomputed.
  - `'dots_with_no_batch_dims_saveable'`: the products without batch dimensions, i.e. activations x weights (the
    linear layers); the attention's `[B, heads, L, L]` products are recomputed.
  - `'attention_out'`: only the attention output `[B, L, heads, head_dim]`, named `ATTENTION_OUT` by `attention`
    (`jax.ad_checkpoint.checkpoint_name`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lpl_jax.models import axes

Dtype = Any
LN_EPS = 1e-6  # DiT's and SD3's LayerNorm (and SD3's QK RMSNorm) epsilon.
FREQ_DIM = 256  # DiT's frequency_embedding_size: 128 cosines and 128 sines of t.
MAX_PERIOD = 10_000.0

XAVIER = nn.initializers.xavier_uniform()
ZEROS = nn.initializers.zeros_init()
NORMAL_002 = nn.initializers.normal(stddev=0.02)
MODULATIONS = ('block', 'single')
# What a rematerialised block keeps for the backward pass (`remat_policy`): nothing, the results of matrix products,
# those without batch dimensions (weights x activations), or only the attention outputs.
REMAT_POLICIES = ('full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'attention_out')
ATTENTION_OUT = 'attention_out'  # the name `attention` gives its output (`checkpoint_name`), for that policy


@functools.cache
def remat_policy(name: str) -> Any:
  """The `jax.checkpoint` policy (`jax.checkpoint_policies`) of one of `REMAT_POLICIES` (the module docstring
  describes them), for `nn.remat(..., policy=remat_policy(name))`. The same object for the same name, so modules that
  hold it compare equal."""
  policies = jax.checkpoint_policies
  if name == 'full':
    return policies.nothing_saveable
  if name == 'dots_saveable':
    return policies.dots_saveable
  if name == 'dots_with_no_batch_dims_saveable':
    return policies.dots_with_no_batch_dims_saveable
  if name == 'attention_out':
    return policies.save_only_these_names(ATTENTION_OUT)
  raise ValueError(f'remat_policy={name!r}; expected one of {REMAT_POLICIES}.')


def table_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
  """PixArt-alpha's `scale_shift_table` initialisation: `randn(n, D) / sqrt(D)`."""
  return jax.random.normal(key, shape, dtype) * shape[-1] ** -0.5


def check_modulation(model: str, modulation: str) -> None:
  if modulation not in MODULATIONS:
    raise ValueError(
      f"{model}: modulation={modulation!r}; expected 'block' (a modulation Linear in every block, adaLN-Zero) or "
      "'single' (one shared Linear and a learned table per block, PixArt-alpha's adaLN-single)."
    )


def at_least_f32(dtype: Dtype) -> Dtype:
  return jnp.promote_types(dtype, jnp.float32)


def dense(
  features: int,
  names: tuple[str | None, str | None],
  dtype: Dtype,
  param_dtype: Dtype,
  *,
  kernel_init: Any = XAVIER,
  name: str | None = None,
) -> nn.Dense:
  """A Linear layer whose kernel `[in, out]` is named `names` and whose bias is named after the output axis."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(kernel_init, names),
    bias_init=nn.with_logical_partitioning(ZEROS, names[-1:]),
  )


def class_table(num_rows: int, features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Embed:
  return nn.Embed(
    num_rows,
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    embedding_init=nn.with_logical_partitioning(NORMAL_002, (axes.CLASSES, axes.EMBED)),
  )


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  # No affine parameters: adaLN's shift and scale replace them. Two-pass variance: the residual stream can have
  # a large mean, where E[x^2] - E[x]^2 cancels badly.
  return nn.LayerNorm(epsilon=LN_EPS, use_bias=False, use_scale=False, use_fast_variance=False, dtype=dtype, name=name)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """`x [B, L, D] * (1 + scale [B, D]) + shift [B, D]` (DiT's adaLN, eq. in section 3.2)."""
  return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = MAX_PERIOD) -> jax.Array:
  """DiT's sinusoidal timestep features: `[cos(t f_0), ..., cos(t f_{d/2-1}), sin(t f_0), ...]`.

  Args:
    t: `[B]` timesteps, integer or continuous (any real dtype); the scale is the caller's (DiT uses 0..999).
    dim: number of features (an odd `dim` gets a trailing zero).
    max_period: the lowest frequency is `1 / max_period`.

  Returns:
    `[B, dim]` float32 with `f_i = max_period ** (-i / (dim // 2))`.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _sincos_2d(embed_dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """MAE's 2D sin-cos embedding of positions `rows`, `cols` (float64, same shape): `[rows.size, embed_dim]` float32,
  the first half of the channels encoding the column, the second half the row."""
  if embed_dim % 4:
    raise ValueError(f'the 2D sin-cos positional embedding needs a width divisible by 4, got {embed_dim}.')
  omega = 1.0 / MAX_PERIOD ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))

  def one_axis(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """The fixed 2D sin-cos positional embedding of MAE/DiT for a `grid_h x grid_w` patch grid (not a parameter).

  The first half of the channels encodes the column index, the second half the row index (MAE's
  `get_2d_sincos_pos_embed`, which meshes `(grid_w, grid_h)`); each half is `[sin(pos w_k), cos(pos w_k)]` with
  `w_k = 10000 ** (-k / (embed_dim / 4))`.

  Returns:
    `[grid_h * grid_w, embed_dim]` float32, rows in row-major (h, w) order, a trace-time constant.
  """
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing='ij')
  return _sincos_2d(embed_dim, rows, cols)


def sincos_pos_embed_table(embed_dim: int, max_size: int, base_size: int) -> np.ndarray:
  """SD3's positional table: the sin-cos embedding on a `max_size x max_size` grid whose positions are spaced
  `base_size / max_size` apart (diffusers' `PatchEmbed` with `pos_embed_max_size`, where `base_size` is the
  training grid, `sample_size // patch_size`, and `interpolation_scale` is 1), so that the whole table spans the
  positions `0..base_size` of the training grid.

  Returns:
    `[max_size * max_size, embed_dim]` float32, rows in row-major (h, w) order (what the checkpoints store, less
    their leading batch axis).
  """
  pos = np.arange(max_size, dtype=np.float64) / (max_size / base_size)
  rows, cols = np.meshgrid(pos, pos, indexing='ij')
  return _sincos_2d(embed_dim, rows, cols)


def cropped_pos_embed(embed_dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int) -> np.ndarray:
  """The centre `grid_h x grid_w` crop of `sincos_pos_embed_table` (SD3: every resolution reads the same table,
  centred): `[grid_h * grid_w, embed_dim]` float32, a trace-time constant."""
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(
      f'a {grid_h}x{grid_w} patch grid does not fit the {max_size}x{max_size} positional table (pos_embed_max_size).'
    )
  table = sincos_pos_embed_table(embed_dim, max_size, base_size).reshape(max_size, max_size, embed_dim)
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  return table[top : top + grid_h, left : left + grid_w].reshape(grid_h * grid_w, embed_dim)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, (H/p)(W/p), p*p*C]`, each patch flattened in (row, column, channel) order, the order of a
  flattened `[p, p, C, D]` convolution kernel and of DiT's `unpatchify`."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, grid_h: int, grid_w: int) -> jax.Array:
  """Inverse of `patchify`: `[B, grid_h*grid_w, p*p*C]` -> `[B, grid_h*p, grid_w*p, C]`."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, c)


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Names a token stream `[B, L, D]` for GSPMD; a no-op unless logical axis rules and a mesh are in effect."""
  return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))


def check_latents(model: str, x: jax.Array, t: jax.Array, in_channels: int, patch_size: int) -> None:
  """Shape checks at trace time: errors name the sizes, before anything compiles."""
  if x.ndim != 4:
    raise ValueError(f'{model}: x must be [B, H, W, C] (NHWC), got shape {x.shape}.')
  b, h, w, c = x.shape
  if c != in_channels:
    raise ValueError(f'{model}: x has {c} channels, the model has in_channels={in_channels} (NHWC layout).')
  if h % patch_size or w % patch_size:
    raise ValueError(f'{model}: image size {h}x{w} is not divisible by the patch size {patch_size}.')
  if t.shape not in ((b,), ()):
    raise ValueError(f'{model}: t must be [B] = [{b}] (or a scalar), got shape {t.shape}.')


def check_labels(model: str, y: jax.Array, batch: int) -> None:
  if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f'{model}: class labels y must be integers of shape [B] = [{batch}], got {y.dtype}{y.shape}.')


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Multi-head scaled dot-product attention, `[B, L, H, D]` each -> `[B, L, H, D]`; logits and softmax in at least
  float32. The output is named `ATTENTION_OUT` for the `'attention_out'` remat policy."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=at_least_f32(q.dtype))
  weights = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
  return checkpoint_name(jnp.einsum('bhqk,bkhd->bqhd', weights, v), ATTENTION_OUT)


class HeadsDense(nn.Module):
  """A Linear layer from the last `in_rank` axes of `x` to `features` axes: kernel `[*in_dims, *features]`, bias
  `[*features]`, Xavier-uniform over the flattened fans (what the PyTorch Linear of the same map gets).

  flax's `DenseGeneral` would do, except that it creates a multi-axis kernel flat and reshapes it afterwards, which
  applies the kernel's logical-axis constraint to the flat array and fails under a mesh with axis rules.
  """

  features: tuple[int, ...]
  names: tuple[str | None, ...]
  in_rank: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.in_rank, len(self.features)
    init = nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
    )
    kernel = self.param(
      'kernel',
      nn.with_logical_partitioning(init, self.names),
      x.shape[x.ndim - n_in :] + tuple(self.features),
      self.param_dtype,
    )
    bias = self.param(
      'bias', nn.with_logical_partitioning(ZEROS, self.names[n_in:]), tuple(self.features), self.param_dtype
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


def qkv_projection(
  num_heads: int, head_dim: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None
) -> HeadsDense:
  """timm's `qkv`: one Linear `D -> 3 * D` with bias, its kernel kept as `[D, 3, heads, head_dim]`."""
  return HeadsDense(
    (3, num_heads, head_dim), (axes.EMBED, None, axes.HEADS, axes.KV), dtype=dtype, param_dtype=param_dtype, name=name
  )


def out_projection(features: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> HeadsDense:
  """The attention output Linear, kernel `[heads, head_dim, D]`."""
  return HeadsDense(
    (features,), (axes.HEADS, axes.KV, axes.EMBED), in_rank=2, dtype=dtype, param_dtype=param_dtype, name=name
  )


class Mlp(nn.Module):
  """Linear -> GELU (tanh approximation, as DiT and SD3) -> Linear, back to the input width."""

  hidden_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(dense(self.hidden_features, (axes.EMBED, axes.MLP), name='fc1', **kw)(x), approximate=True)
    return dense(x.shape[-1], (axes.MLP, axes.EMBED), name='fc2', **kw)(h)


class AdaLNModulation(nn.Module):
  """SiLU -> Linear `D -> n * D` (zero-initialised unless `kernel_init` says otherwise), split into `n` arrays
  `[B, D]` (shift, scale, gate, ...)."""

  num_chunks: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = ZEROS

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    out = dense(
      self.num_chunks * self.features,
      (axes.EMBED, axes.ADALN),
      self.dtype,
      self.param_dtype,
      kernel_init=self.kernel_init,
      name='linear',
    )(nn.silu(c))
    return jnp.split(out, self.num_chunks, axis=-1)


class ModulationTable(nn.Module):
  """adaLN-single's per-block part: the shared modulation vectors plus this block's learned `scale_shift_table
  [num_chunks, D]` (PixArt-alpha section 2.3; diffusers' `PixArtTransformer2DModel` blocks). The sum is in `dtype`,
  as a block's own modulation Linear computes in `dtype`."""

  num_chunks: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, shared: Sequence[jax.Array]) -> list[jax.Array]:
    """`shared`: at least `num_chunks` arrays `[B, D]`, of which the first `num_chunks` are used (a context stream
    that is pre-only takes the attention's shift and scale) -> `num_chunks` arrays `[B, D]`."""
    d = shared[0].shape[-1]
    table = self.param(
      'scale_shift_table',
      nn.with_logical_partitioning(table_init, (None, axes.EMBED)),
      (self.num_chunks, d),
      self.param_dtype,
    )
    table = jnp.asarray(table, self.dtype)
    return [jnp.asarray(s, self.dtype) + table[i] for i, s in enumerate(shared[: self.num_chunks])]


def block_modulation(
  modulation: str, num_chunks: int, features: int, dtype: Dtype, param_dtype: Dtype, name: str = 'adaLN_modulation'
) -> AdaLNModulation | ModulationTable:
  """The modulation of one block or stream: its own Linear of `c` (`'block'`), called with `c [B, D]`, or a table
  added to the shared vectors (`'single'`), called with the list of 6 shared arrays `[B, D]`."""
  check_modulation('block_modulation', modulation)
  if modulation == 'single':
    return ModulationTable(num_chunks, dtype=dtype, param_dtype=param_dtype, name=name)
  return AdaLNModulation(num_chunks, features, dtype=dtype, param_dtype=param_dtype, name=name)


def shared_modulation(modulation: str, c: jax.Array, dtype: Dtype, param_dtype: Dtype) -> jax.Array | list[jax.Array]:
  """What a model's blocks take as their conditioning: `c [B, D]` itself (`'block'`), or adaLN-single's one shared
  SiLU + Linear `D -> 6D` of it, as 6 arrays `[B, D]` (`'single'`; N(0, 0.02) kernel as in PixArt-alpha)."""
  if modulation == 'block':
    return c
  return AdaLNModulation(
    6, c.shape[-1], dtype=dtype, param_dtype=param_dtype, kernel_init=NORMAL_002, name='adaLN_single'
  )(c)


class TimestepEmbedder(nn.Module):
  """`t [B]` -> 256 sinusoidal features -> Linear -> SiLU -> Linear -> `[B, D]` (DiT's `TimestepEmbedder`)."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=NORMAL_002)
    h = dense(self.features, (axes.FREQ, axes.MLP), name='fc1', **kw)(timestep_embedding(t))
    return dense(self.features, (axes.MLP, axes.EMBED), name='fc2', **kw)(nn.silu(h))


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> LayerNorm -> modulate -> zero-initialised Linear to `p*p*C_out` per token.

  With `modulation='single'` the shift and scale are a learned `[2, D]` table plus `c` itself, with no Linear
  (PixArt-alpha's `T2IFinalLayer`, which adds the timestep embedding to its table)."""

  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  modulation: str = 'block'

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    adaln = block_modulation(self.modulation, 2, x.shape[-1], **kw)
    shift, scale = adaln([c, c] if self.modulation == 'single' else c)
    h = modulate(layer_norm(self.dtype, name='norm_final')(x), shift, scale)
    return dense(self.out_features, (axes.EMBED, axes.PATCH), kernel_init=ZEROS, name='linear', **kw)(h)
