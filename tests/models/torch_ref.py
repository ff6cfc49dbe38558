"""diffusers reference denoisers (DiT, SD3's MMDiT) with random weights, and their weights in our layout.

The conversions are written from diffusers' module structure, not from our code: a wrong head split, chunk order
or patch flattening on our side shows up as a mismatch of outputs.
"""

import numpy as np


def randomize_(module, seed: int) -> None:
  """Random values for every parameter (zero-initialised adaLN and output layers would hide most of the model)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 and 'norm' in name:  # RMSNorm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:])))


def _np(t):
  return t.detach().cpu().numpy().astype(np.float32)


def _linear(lin, swap_halves: bool = False) -> dict:
  w, b = _np(lin.weight).T, _np(lin.bias)
  if swap_halves:  # diffusers' AdaLayerNormContinuous chunks (scale, shift); DiT and we use (shift, scale).
    w, b = np.concatenate(np.split(w, 2, axis=1)[::-1], axis=1), np.concatenate(np.split(b, 2)[::-1])
  return {'kernel': w, 'bias': b}


def _patch_embed(conv) -> dict:
  w = _np(conv.weight)  # [D, C, p, p]
  return {'kernel': w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), 'bias': _np(conv.bias)}


def _qkv(q, k, v, heads: int) -> dict:
  w = np.stack([_np(m.weight).T for m in (q, k, v)], axis=1)  # [D, 3, D]
  b = np.stack([_np(m.bias) for m in (q, k, v)])  # [3, D]
  d = w.shape[0]
  return {'kernel': w.reshape(d, 3, heads, d // heads), 'bias': b.reshape(3, heads, d // heads)}


def _out(lin, heads: int) -> dict:
  w = _np(lin.weight).T
  return {'kernel': w.reshape(heads, w.shape[0] // heads, w.shape[1]), 'bias': _np(lin.bias)}


def _ff(ff) -> dict:
  return {'fc1': _linear(ff.net[0].proj), 'fc2': _linear(ff.net[2])}


def dit_params(model, heads: int) -> dict:
  """Our DiT params from a diffusers `DiTTransformer2DModel` whose per-block embedders all hold the same weights
  (diffusers gives every block its own copy of the timestep and label embedders; DiT has one)."""
  blocks = model.transformer_blocks
  emb = blocks[0].norm1.emb
  params = {
    'x_embedder': _patch_embed(model.pos_embed.proj),
    't_embedder': {'fc1': _linear(emb.timestep_embedder.linear_1), 'fc2': _linear(emb.timestep_embedder.linear_2)},
    'y_embedder': {'embedding': _np(emb.class_embedder.embedding_table.weight)},
    'final_layer': {'adaLN_modulation': {'linear': _linear(model.proj_out_1)}, 'linear': _linear(model.proj_out_2)},
  }
  for i, blk in enumerate(blocks):
    a = blk.attn1
    params[f'blocks_{i}'] = {
      'adaLN_modulation': {'linear': _linear(blk.norm1.linear)},
      'qkv': _qkv(a.to_q, a.to_k, a.to_v, heads),
      'proj': _out(a.to_out[0], heads),
      'mlp': _ff(blk.ff),
    }
  return params


def sd3_params(model, heads: int) -> dict:
  """Our text-conditional MMDiT params from a diffusers `SD3Transformer2DModel` (with `qk_norm='rms_norm'`)."""
  tte = model.time_text_embed
  params = {
    'x_embedder': _patch_embed(model.pos_embed.proj),
    't_embedder': {'fc1': _linear(tte.timestep_embedder.linear_1), 'fc2': _linear(tte.timestep_embedder.linear_2)},
    'pooled_embedder_fc1': _linear(tte.text_embedder.linear_1),
    'pooled_embedder_fc2': _linear(tte.text_embedder.linear_2),
    'context_embedder': _linear(model.context_embedder),
    'final_layer': {
      'adaLN_modulation': {'linear': _linear(model.norm_out.linear, swap_halves=True)},
      'linear': _linear(model.proj_out),
    },
  }
  for i, blk in enumerate(model.transformer_blocks):
    a = blk.attn
    image = {
      'adaLN_modulation': {'linear': _linear(blk.norm1.linear)},
      'qkv': _qkv(a.to_q, a.to_k, a.to_v, heads),
      'q_norm': {'scale': _np(a.norm_q.weight)},
      'k_norm': {'scale': _np(a.norm_k.weight)},
      'proj': _out(a.to_out[0], heads),
      'mlp': _ff(blk.ff),
    }
    context = {
      'adaLN_modulation': {'linear': _linear(blk.norm1_context.linear, swap_halves=blk.context_pre_only)},
      'qkv': _qkv(a.add_q_proj, a.add_k_proj, a.add_v_proj, heads),
      'q_norm': {'scale': _np(a.norm_added_q.weight)},
      'k_norm': {'scale': _np(a.norm_added_k.weight)},
    }
    if not blk.context_pre_only:
      context |= {'proj': _out(a.to_add_out, heads), 'mlp': _ff(blk.ff_context)}
    params[f'blocks_{i}'] = {'image': image, 'context': context}
  return params
