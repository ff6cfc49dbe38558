"""SD3 transformer weights in and out: diffusers' `SD3Transformer2DModel` <-> our text-conditional `MMDiT`.

  ours                              diffusers
  x_embedder                        pos_embed.proj (conv)
  (computed, checked)               pos_embed.pos_embed [1, M*M, D] (with pos_embed_max_size M)
  t_embedder.fc1/fc2                time_text_embed.timestep_embedder.linear_1/2
  pooled_embedder_fc1/fc2           time_text_embed.text_embedder.linear_1/2
  context_embedder                  context_embedder
  blocks_i.image.*                  transformer_blocks.{i}.norm1.linear, attn.to_q/k/v, attn.norm_q/k,
                                      attn.to_out.0, ff.net.0.proj / ff.net.2
  blocks_i.context.*                transformer_blocks.{i}.norm1_context.linear, attn.add_q/k/v_proj,
                                      attn.norm_added_q/k, attn.to_add_out, ff_context.net.0.proj / .2
  final_layer.adaLN_modulation      norm_out.linear (chunks (scale, shift): swapped)
  final_layer.linear                proj_out

The last block's context stream is pre-only in both; its `norm1_context` is an `AdaLayerNormContinuous`, whose
(scale, shift) chunks are swapped like `norm_out`'s. SD3.5-medium's MMDiT-X blocks (`dual_attention_layers`) have a
second image attention our model does not, and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import weights
from lpl_jax.models import convert_layout as C
from lpl_jax.models.convert_layout import Rule
from lpl_jax.models.layers import sincos_pos_embed_table
from lpl_jax.models.mmdit import MMDiT

CLASS_NAME = 'SD3Transformer2DModel'
POS_EMBED = 'pos_embed.pos_embed'


def rules(model: MMDiT) -> list[Rule]:
  """The rules between a text-conditional `model`'s parameters and an `SD3Transformer2DModel` state dict."""
  h = model.num_heads
  out = [
    Rule(('x_embedder',), 'patch', ('pos_embed.proj',), model.patch_size),
    Rule(('t_embedder', 'fc1'), 'linear', ('time_text_embed.timestep_embedder.linear_1',)),
    Rule(('t_embedder', 'fc2'), 'linear', ('time_text_embed.timestep_embedder.linear_2',)),
    Rule(('pooled_embedder_fc1',), 'linear', ('time_text_embed.text_embedder.linear_1',)),
    Rule(('pooled_embedder_fc2',), 'linear', ('time_text_embed.text_embedder.linear_2',)),
    Rule(('context_embedder',), 'linear', ('context_embedder',)),
    Rule(('final_layer', 'adaLN_modulation', 'linear'), 'linear_swap', ('norm_out.linear',)),
    Rule(('final_layer', 'linear'), 'linear', ('proj_out',)),
  ]
  for i in range(model.depth):
    b, a, pre_only = f'transformer_blocks.{i}', f'transformer_blocks.{i}.attn', i == model.depth - 1
    image, context = (f'blocks_{i}', 'image'), (f'blocks_{i}', 'context')
    out += [
      Rule(image + ('adaLN_modulation', 'linear'), 'linear', (f'{b}.norm1.linear',)),
      Rule(image + ('qkv',), 'qkv', (f'{a}.to_q', f'{a}.to_k', f'{a}.to_v'), h),
      Rule(image + ('proj',), 'out', (f'{a}.to_out.0',), h),
      Rule(image + ('mlp', 'fc1'), 'linear', (f'{b}.ff.net.0.proj',)),
      Rule(image + ('mlp', 'fc2'), 'linear', (f'{b}.ff.net.2',)),
      Rule(
        context + ('adaLN_modulation', 'linear'),
        'linear_swap' if pre_only else 'linear',
        (f'{b}.norm1_context.linear',),
      ),
      Rule(context + ('qkv',), 'qkv', (f'{a}.add_q_proj', f'{a}.add_k_proj', f'{a}.add_v_proj'), h),
    ]
    if model.qk_norm:
      out += [
        Rule(image + ('q_norm',), 'scale', (f'{a}.norm_q',)),
        Rule(image + ('k_norm',), 'scale', (f'{a}.norm_k',)),
        Rule(context + ('q_norm',), 'scale', (f'{a}.norm_added_q',)),
        Rule(context + ('k_norm',), 'scale', (f'{a}.norm_added_k',)),
      ]
    if not pre_only:
      out += [
        Rule(context + ('proj',), 'out', (f'{a}.to_add_out',), h),
        Rule(context + ('mlp', 'fc1'), 'linear', (f'{b}.ff_context.net.0.proj',)),
        Rule(context + ('mlp', 'fc2'), 'linear', (f'{b}.ff_context.net.2',)),
      ]
  return out


def param_shapes(model: MMDiT) -> dict:
  """`{path: shape}` of a text-conditional `model`'s parameters (traced)."""
  p = model.patch_size
  x, t = jnp.zeros((1, p, p, model.in_channels)), jnp.zeros((1,))
  ctx, pooled = jnp.zeros((1, 1, model.context_dim)), jnp.zeros((1, model.pooled_dim))
  init = lambda: nn.unbox(model.init(jax.random.key(0), x, t, context=ctx, pooled=pooled)['params'])
  return weights.expected_shapes(init)


def pos_embed_table(model: MMDiT) -> np.ndarray | None:
  """`[1, M*M, D]` the table diffusers stores for `model` (None without `pos_embed_max_size`)."""
  if model.pos_embed_max_size is None:
    return None
  m = model.pos_embed_max_size
  base = m if model.pos_embed_base_size is None else model.pos_embed_base_size
  return sincos_pos_embed_table(model.hidden_size, m, base)[None]


def model_from_config(cfg: Mapping[str, Any], source: str, **kwargs) -> MMDiT:
  """Our text-conditional `MMDiT` for a diffusers `SD3Transformer2DModel` config (`source` names the file).

  Raises:
    ValueError: a field describes something our MMDiT is not (naming the field, its value and the one expected).
  """
  heads, head_dim = cfg.get('num_attention_heads', 18), cfg.get('attention_head_dim', 64)
  width, patch, in_channels = heads * head_dim, cfg.get('patch_size', 2), cfg.get('in_channels', 16)
  bad = []
  if cfg.get('dual_attention_layers'):
    bad.append(
      f'dual_attention_layers={list(cfg["dual_attention_layers"])} (expected none: these are SD3.5 MMDiT-X blocks '
      'with a second image self-attention, which our MMDiT does not have)'
    )
  if cfg.get('qk_norm') not in (None, 'rms_norm'):
    bad.append(f"qk_norm={cfg['qk_norm']!r} (expected None or 'rms_norm')")
  if cfg.get('caption_projection_dim', 1152) != width:
    bad.append(
      f'caption_projection_dim={cfg.get("caption_projection_dim", 1152)} (expected num_attention_heads x '
      f'attention_head_dim = {width}: our context stream has the model width)'
    )
  if cfg.get('out_channels') not in (None, in_channels):
    bad.append(f'out_channels={cfg["out_channels"]} (expected in_channels={in_channels})')
  if cfg.get('pooled_projection_dim', 2048) is None:
    bad.append('pooled_projection_dim=None (expected the pooled text embedding width)')
  if bad:
    raise ValueError(f'{source}: not an SD3 transformer our MMDiT can express: ' + '; '.join(bad) + '.')
  max_size = cfg.get('pos_embed_max_size', 96)
  return MMDiT(
    patch_size=patch,
    hidden_size=width,
    depth=cfg.get('num_layers', 18),
    num_heads=heads,
    in_channels=in_channels,
    context_dim=cfg.get('joint_attention_dim', 4096),
    pooled_dim=cfg.get('pooled_projection_dim', 2048),
    qk_norm=cfg.get('qk_norm') == 'rms_norm',
    pos_embed_max_size=max_size,
    pos_embed_base_size=cfg.get('sample_size', 128) // patch if max_size else None,
    **kwargs,
  )


def diffusers_config(model: MMDiT, sample_size: int | None) -> dict[str, Any]:
  """The `config.json` of `model` as an `SD3Transformer2DModel`. With `pos_embed_max_size`, `sample_size` is
  `pos_embed_base_size * patch_size` (diffusers derives the table's spacing from it); without, it is the latent
  side at which diffusers' positions are 0, 1, ... as ours (at other sides it interpolates them; default 128).

  Raises:
    ValueError: the model has no SD3 counterpart (class-conditional, adaLN-single, no pooled embedding, an MLP ratio
      other than 4, a `sample_size` that contradicts `pos_embed_base_size`).
  """
  what = 'a diffusers SD3Transformer2DModel'
  if model.context_dim is None:
    raise ValueError(
      f'{what} is text-conditional; this MMDiT is class-conditional (context_dim=None), which no diffusers class '
      'expresses.'
    )
  problems = []
  if model.pooled_dim is None:
    problems.append('pooled_dim=None (SD3 always adds a pooled text embedding)')
  if model.modulation != 'block':
    problems.append(f"modulation={model.modulation!r} (SD3 has a modulation Linear per block: 'block')")
  if model.mlp_ratio != 4.0:
    problems.append(f'mlp_ratio={model.mlp_ratio} (SD3 has MLPs of 4 x the width)')
  if model.pos_embed_max_size is not None:
    derived = (model.pos_embed_base_size or model.pos_embed_max_size) * model.patch_size
    if sample_size not in (None, derived):
      problems.append(
        f'sample_size={sample_size} (with pos_embed_max_size it is pos_embed_base_size x patch_size = {derived})'
      )
    sample_size = derived
  if problems:
    raise ValueError(f'{what} cannot express this MMDiT: ' + '; '.join(problems) + '.')
  return {
    '_class_name': CLASS_NAME,
    'sample_size': 128 if sample_size is None else sample_size,
    'patch_size': model.patch_size,
    'in_channels': model.in_channels,
    'num_layers': model.depth,
    'attention_head_dim': model.hidden_size // model.num_heads,
    'num_attention_heads': model.num_heads,
    'joint_attention_dim': model.context_dim,
    'caption_projection_dim': model.hidden_size,
    'pooled_projection_dim': model.pooled_dim,
    'out_channels': model.in_channels,
    'pos_embed_max_size': model.pos_embed_max_size,
    'dual_attention_layers': [],
    'qk_norm': 'rms_norm' if model.qk_norm else None,
  }


def import_diffusers(tensors, model: MMDiT, *, source: str, target: str) -> dict:
  """`(name, tensor)` pairs of an `SD3Transformer2DModel` file -> our NumPy parameters, strictly checked; the
  stored positional table must be the one the model computes."""
  table, shapes = pos_embed_table(model), param_shapes(model)
  expected = C.state_shapes(rules(model), shapes) | ({} if table is None else {POS_EMBED: table.shape})
  state = C.check_tensors(tensors, expected, target=target)
  if table is not None:
    m, base = model.pos_embed_max_size, model.pos_embed_base_size
    what = f'the sin-cos table of a {m}x{m} grid spanning positions 0..{base}, from sample_size // patch_size'
    C.check_buffer(state, POS_EMBED, table, source=source, what=what)
  params = C.from_state_dict(rules(model), state, source=source, why_copies='')
  C.check_converted(params, shapes)
  return params


def export_buffers(model: MMDiT) -> dict[str, np.ndarray]:
  """The fixed tensors diffusers keeps in the state dict of `model`'s SD3 counterpart."""
  table = pos_embed_table(model)
  return {} if table is None else {POS_EMBED: table}
