"""DiT weights in and out: diffusers' `DiTTransformer2DModel` folders and facebookresearch/DiT `.pt` state dicts.

Both hold the official architecture (`lpl_jax.models.dit`) under other names:

  ours                      diffusers                                        official DiT
  x_embedder                pos_embed.proj (conv)                            x_embedder.proj (conv)
  t_embedder.fc1/fc2        transformer_blocks.{i}.norm1.emb.timestep_       t_embedder.mlp.0/.2
                              embedder.linear_1/2 (a copy in every block)
  y_embedder                ...norm1.emb.class_embedder.embedding_table      y_embedder.embedding_table
  blocks_i.adaLN_modulation transformer_blocks.{i}.norm1.linear              blocks.{i}.adaLN_modulation.1
  blocks_i.qkv              ...attn1.to_q/to_k/to_v                          blocks.{i}.attn.qkv (fused)
  blocks_i.proj             ...attn1.to_out.0                                blocks.{i}.attn.proj
  blocks_i.mlp.fc1/fc2      ...ff.net.0.proj / ff.net.2                      blocks.{i}.mlp.fc1/fc2
  final_layer.adaLN...      proj_out_1                                       final_layer.adaLN_modulation.1
  final_layer.linear        proj_out_2                                       final_layer.linear
  (computed)                (not stored)                                     pos_embed [1, N, D] (checked)

diffusers' DiT departs from the official forward in two constants that are not in its config or weights: its
timestep frequencies are `10000 ** (-i / 127)` (`downscale_freq_shift=1`) where DiT's are `10000 ** (-i / 128)`, and
the LayerNorm before each MLP uses `norm_eps` (1e-5 by default) where DiT's uses 1e-6. An imported model computes the
official forward, which the weights were trained with (diffusers' checkpoints are conversions of the official ones);
an export writes `norm_eps=1e-6`, so the timestep frequencies remain diffusers' only difference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import weights
from lpl_jax.models import convert_layout as C
from lpl_jax.models.convert_layout import Rule
from lpl_jax.models.dit import SIZES, DiT
from lpl_jax.models.layers import sincos_pos_embed_2d

_SHARED = 'our DiT has one timestep and one label embedder, shared by all blocks'
# diffusers config fields whose other values describe an architecture DiT does not have (values diffusers' DiT
# checkpoints hold; the legacy `Transformer2DModel` class name adds the cross-attention fields).
_REQUIRED = {
  'norm_type': 'ada_norm_zero',
  'activation_fn': 'gelu-approximate',
  'attention_bias': True,
  'norm_elementwise_affine': False,
  'cross_attention_dim': None,
  'num_vector_embeds': None,
  'only_cross_attention': False,
  'double_self_attention': False,
  'caption_channels': None,
}


def diffusers_rules(model: DiT) -> list[Rule]:
  """The rules between `model`'s parameters and a `DiTTransformer2DModel` state dict."""
  h, blocks = model.num_heads, [f'transformer_blocks.{i}' for i in range(model.depth)]
  emb = [f'{b}.norm1.emb' for b in blocks]

  def shared(ours, kind, leaf):
    return Rule(ours, kind, (f'{emb[0]}.{leaf}',), copies=tuple(f'{e}.{leaf}' for e in emb[1:]))

  rules = [
    Rule(('x_embedder',), 'patch', ('pos_embed.proj',), model.patch_size),
    shared(('t_embedder', 'fc1'), 'linear', 'timestep_embedder.linear_1'),
    shared(('t_embedder', 'fc2'), 'linear', 'timestep_embedder.linear_2'),
    shared(('y_embedder',), 'embedding', 'class_embedder.embedding_table'),
    Rule(('final_layer', 'adaLN_modulation', 'linear'), 'linear', ('proj_out_1',)),
    Rule(('final_layer', 'linear'), 'linear', ('proj_out_2',)),
  ]
  for i, b in enumerate(blocks):
    ours = f'blocks_{i}'
    rules += [
      Rule((ours, 'adaLN_modulation', 'linear'), 'linear', (f'{b}.norm1.linear',)),
      Rule((ours, 'qkv'), 'qkv', tuple(f'{b}.attn1.to_{x}' for x in 'qkv'), h),
      Rule((ours, 'proj'), 'out', (f'{b}.attn1.to_out.0',), h),
      Rule((ours, 'mlp', 'fc1'), 'linear', (f'{b}.ff.net.0.proj',)),
      Rule((ours, 'mlp', 'fc2'), 'linear', (f'{b}.ff.net.2',)),
    ]
  return rules


def official_rules(model: DiT) -> list[Rule]:
  """The rules between `model`'s parameters and a facebookresearch/DiT state dict (less its `pos_embed`)."""
  h = model.num_heads
  rules = [
    Rule(('x_embedder',), 'patch', ('x_embedder.proj',), model.patch_size),
    Rule(('t_embedder', 'fc1'), 'linear', ('t_embedder.mlp.0',)),
    Rule(('t_embedder', 'fc2'), 'linear', ('t_embedder.mlp.2',)),
    Rule(('y_embedder',), 'embedding', ('y_embedder.embedding_table',)),
    Rule(('final_layer', 'adaLN_modulation', 'linear'), 'linear', ('final_layer.adaLN_modulation.1',)),
    Rule(('final_layer', 'linear'), 'linear', ('final_layer.linear',)),
  ]
  for i in range(model.depth):
    ours, b = f'blocks_{i}', f'blocks.{i}'
    rules += [
      Rule((ours, 'adaLN_modulation', 'linear'), 'linear', (f'{b}.adaLN_modulation.1',)),
      Rule((ours, 'qkv'), 'qkv_fused', (f'{b}.attn.qkv',), h),
      Rule((ours, 'proj'), 'out', (f'{b}.attn.proj',), h),
      Rule((ours, 'mlp', 'fc1'), 'linear', (f'{b}.mlp.fc1',)),
      Rule((ours, 'mlp', 'fc2'), 'linear', (f'{b}.mlp.fc2',)),
    ]
  return rules


def param_shapes(model: DiT) -> dict:
  """`{path: shape}` of `model`'s parameters (traced)."""
  p = model.patch_size
  x, t, y = jnp.zeros((1, p, p, model.in_channels)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  return weights.expected_shapes(lambda: nn.unbox(model.init(jax.random.key(0), x, t, y)['params']))


def model_from_config(cfg: Mapping[str, Any], source: str, **kwargs) -> DiT:
  """Our `DiT` for a diffusers `DiTTransformer2DModel` config (`source` names the file in errors).

  Raises:
    ValueError: a field describes something our DiT is not (naming the field, its value and the one expected).
  """
  bad = [f'{k}={cfg[k]!r} (expected {v!r})' for k, v in _REQUIRED.items() if k in cfg and cfg[k] != v]
  if cfg.get('num_embeds_ada_norm') is None:
    bad.append('num_embeds_ada_norm=None (expected the number of classes)')
  if cfg.get('patch_size') is None:
    bad.append('patch_size=None (expected the patch size of a patch-based DiT)')
  in_channels = cfg.get('in_channels', 4)
  out_channels = cfg.get('out_channels') or in_channels
  if out_channels not in (in_channels, 2 * in_channels):
    bad.append(f'out_channels={out_channels} (expected in_channels={in_channels}, or twice that with learned sigma)')
  if bad:
    raise ValueError(f'{source}: not a DiT our model can express: ' + '; '.join(bad) + '.')
  heads, head_dim = cfg.get('num_attention_heads', 16), cfg.get('attention_head_dim', 72)
  return DiT(
    patch_size=cfg['patch_size'],
    hidden_size=heads * head_dim,
    depth=cfg.get('num_layers', 28),
    num_heads=heads,
    in_channels=in_channels,
    num_classes=cfg['num_embeds_ada_norm'],
    learn_sigma=out_channels == 2 * in_channels,
    **kwargs,
  )


def check_layout(model: DiT, what: str) -> None:
  if model.modulation != 'block':
    raise ValueError(
      f"{what}: this DiT has modulation={model.modulation!r}; only modulation='block' (a modulation Linear in every "
      'block, adaLN-Zero) has that layout.'
    )
  if model.mlp_ratio != 4.0:
    raise ValueError(f'{what}: this DiT has mlp_ratio={model.mlp_ratio}; that format has MLPs of 4 x the width.')


def diffusers_config(model: DiT, sample_size: int) -> dict[str, Any]:
  """The `config.json` of `model` as a `DiTTransformer2DModel` (`sample_size`: the latent side diffusers sizes its
  positional embedding for; at other sides it interpolates positions, which DiT does not)."""
  check_layout(model, 'a diffusers DiTTransformer2DModel')
  return {
    '_class_name': 'DiTTransformer2DModel',
    'num_attention_heads': model.num_heads,
    'attention_head_dim': model.hidden_size // model.num_heads,
    'in_channels': model.in_channels,
    'out_channels': model.out_channels,
    'num_layers': model.depth,
    'dropout': 0.0,
    'norm_num_groups': 32,
    'attention_bias': True,
    'sample_size': sample_size,
    'patch_size': model.patch_size,
    'activation_fn': 'gelu-approximate',
    'num_embeds_ada_norm': model.num_classes,
    'upcast_attention': False,
    'norm_type': 'ada_norm_zero',
    'norm_elementwise_affine': False,
    'norm_eps': 1e-6,  # DiT's; diffusers' default 1e-5 departs from it
  }


def import_diffusers(tensors, model: DiT, *, source: str, target: str) -> dict:
  """`(name, tensor)` pairs of a `DiTTransformer2DModel` file -> our NumPy parameters, strictly checked."""
  rules = diffusers_rules(model)
  shapes = param_shapes(model)
  state = C.check_tensors(tensors, C.state_shapes(rules, shapes), target=target)
  params = C.from_state_dict(rules, state, source=source, why_copies=_SHARED)
  C.check_converted(params, shapes)
  return params


def _infer_model(state: Mapping[str, np.ndarray], path: str, num_heads: int | None, **kwargs) -> DiT:
  """Our `DiT` from the shapes of an official state dict; the heads from DiT's sizes table or `num_heads`."""
  needed = ('x_embedder.proj.weight', 'y_embedder.embedding_table.weight', 'final_layer.linear.weight')
  missing = [n for n in needed if n not in state or np.ndim(state[n]) != (4 if 'proj' in n else 2)]
  depth = len({n.split('.')[1] for n in state if n.startswith('blocks.') and n.endswith('.attn.qkv.weight')})
  if missing or depth == 0 or 'blocks.0.mlp.fc1.weight' not in state:
    raise weights.WeightsMismatchError(
      f'{path!r} is not a facebookresearch/DiT state dict: the model cannot be inferred without '
      f'{", ".join(missing) or "blocks.N.attn.qkv.weight and blocks.0.mlp.fc1.weight"}; pass model= to check it '
      'against a given one.'
    )
  d, c, p, _ = state['x_embedder.proj.weight'].shape
  out = state['final_layer.linear.weight'].shape[0] // (p * p)
  if out not in (c, 2 * c):
    raise weights.WeightsMismatchError(
      f'{path!r}: final_layer.linear.weight has {state["final_layer.linear.weight"].shape[0]} rows = {p}x{p} patches '
      f'x {out} channels; expected {c} (in_channels) or {2 * c} (learned sigma).'
    )
  if num_heads is None:
    sizes = {(depth_, width): heads for depth_, width, heads in SIZES.values()}
    if (depth, d) not in sizes:
      raise ValueError(
        f'{path!r}: a DiT of depth {depth} and width {d} is none of the paper sizes {sorted(SIZES.values())}, and '
        'the number of heads is not in the weights: pass num_heads= (or model=).'
      )
    num_heads = sizes[depth, d]
  return DiT(
    patch_size=p,
    hidden_size=d,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=state['blocks.0.mlp.fc1.weight'].shape[0] / d,
    in_channels=c,
    num_classes=state['y_embedder.embedding_table.weight'].shape[0] - 1,
    learn_sigma=out == 2 * c,
    **kwargs,
  )


def from_pytorch_checkpoint(
  path: str | os.PathLike,
  *,
  model: DiT | None = None,
  num_heads: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
) -> tuple[DiT, dict]:
  """Loads a facebookresearch/DiT checkpoint (`DiT-XL-2-256x256.pt`, or a `train.py` checkpoint).

  The file is read with `torch.load(weights_only=True)` (torch is imported here only). A training checkpoint
  (`{'model', 'ema', 'opt', 'args'}`) gives its EMA weights, as DiT's own `find_model` does, or its `model` weights
  when it has no `ema`. The file's fixed `pos_embed [1, N, D]` must be DiT's sin-cos table for a square grid (our
  model computes it for any resolution).

  Args:
    path: the `.pt` file.
    model: the `DiT` the weights are for; None infers depth, width, patch size, channels, classes, `learn_sigma` and
      MLP ratio from the tensor shapes, and the heads from the paper's sizes (`dit.SIZES`) or `num_heads`.
    num_heads: heads of a model that is not one of the paper's sizes (when `model` is None).
    dtype, param_dtype, remat: of the inferred model (a given `model` keeps its own).

  Returns:
    `(model, params)`, params as `param_dtype` (or `model.param_dtype`) jax arrays.

  Raises:
    ValueError: the file is not a torch state dict (naming it), or the heads are unknown.
    WeightsMismatchError: naming every missing, unexpected or mis-shaped tensor, or a `pos_embed` that is not the
      sin-cos table.
  """
  path = os.fspath(path)
  state = weights.read_torch_state_dict(
    path,
    float_dtype=None,
    select=('ema', 'model'),
    no_torch_hint='Convert the checkpoint to a diffusers folder elsewhere and use from_diffusers.',
  )
  if model is None:
    model = _infer_model(state, path, num_heads, dtype=dtype, param_dtype=param_dtype, remat=remat)
  check_layout(model, f'{path!r} (facebookresearch/DiT layout)')
  rules, shapes = official_rules(model), param_shapes(model)
  # The grid is the file's (DiT's models are trained at one resolution); a missing or non-square pos_embed is
  # reported against DiT-256's 16 x 16 grid or the nearest square.
  n = np.shape(state.get('pos_embed', ()))
  grid = int(round(n[1] ** 0.5)) if len(n) == 3 and n[1] else 16
  expected = C.state_shapes(rules, shapes) | {'pos_embed': (1, grid * grid, model.hidden_size)}
  source = f'{path!r} (facebookresearch/DiT layout)'
  state = C.check_tensors(state.items(), expected, target=f'the {_describe(model)} ({source})')
  C.check_buffer(
    state,
    'pos_embed',
    sincos_pos_embed_2d(model.hidden_size, grid, grid)[None],
    source=source,
    what=f'the 2D sin-cos table of a {grid}x{grid} grid',
  )
  params = C.from_state_dict(rules, state, source=source, why_copies='')
  C.check_converted(params, shapes)
  return model, C.cast(params, model.param_dtype)


def _describe(model: DiT) -> str:
  return (
    f'DiT (depth {model.depth}, width {model.hidden_size}, patch {model.patch_size}, {model.in_channels} -> '
    f'{model.out_channels} channels, {model.num_classes} classes)'
  )
