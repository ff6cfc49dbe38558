"""Denoiser weights in and out: diffusers DiT and SD3 folders (fp32/fp16/bf16, sharded), exports that diffusers
loads, facebookresearch/DiT `.pt` files, and the errors of broken or foreign files.

References are independent of our conversion: diffusers' PyTorch modules for the diffusers formats, and for DiT's
`.pt` files a transcription of the official forward (`facebookresearch/DiT`, `models.py`) in PyTorch, with the
official module names, so that its `state_dict()` is the official layout.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from lpl_jax import models
from lpl_jax.models import convert_dit
from lpl_jax.weights import WeightsMismatchError
from tests.models import torch_ref
from tests.models.common import fast_jit, inputs, jitted_apply, perturb

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
SD3 = dict(
  sample_size=8,
  patch_size=2,
  in_channels=4,
  num_layers=2,
  attention_head_dim=8,
  num_attention_heads=4,
  joint_attention_dim=12,
  caption_projection_dim=32,
  pooled_projection_dim=10,
  out_channels=4,
  pos_embed_max_size=16,
)
WEIGHTS = 'diffusion_pytorch_model.safetensors'


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def close(got, want, rtol=1e-4):
  """Within `rtol` of the reference's largest magnitude (elementwise relative errors of near-zero outputs say
  nothing); returns (max abs, max abs / max |want|) for the record."""
  got, want = np.asarray(got), np.asarray(want)
  err = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  assert err <= rtol * scale, (err, scale)
  return err, err / scale


def dit_reference(learn_sigma: bool, seed: int = 0):
  """A random diffusers DiT whose per-block embedders are copies of block 0's (DiT has one set)."""
  torch.manual_seed(seed)
  ref = diffusers.DiTTransformer2DModel(
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    in_channels=4,
    out_channels=8 if learn_sigma else 4,
    patch_size=2,
    sample_size=8,
    num_embeds_ada_norm=10,
  ).eval()
  torch_ref.randomize_(ref, seed=seed + 1)
  emb0 = ref.transformer_blocks[0].norm1.emb
  for blk in ref.transformer_blocks[1:]:
    blk.norm1.emb.load_state_dict(emb0.state_dict())
  return ref


def as_official(ref):
  """diffusers' DiT with the two constants in which it departs from the official DiT set to the official values:
  timestep frequencies over `half` (not `half - 1`) and the pre-MLP LayerNorm epsilon 1e-6 (not 1e-5)."""
  for blk in ref.transformer_blocks:
    blk.norm1.emb.time_proj.downscale_freq_shift = 0
    blk.norm3.eps = 1e-6
  return ref


def dit_forward(ref, x, t, y):
  with torch.no_grad():
    out = ref(nchw(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y).long()).sample
  return out.numpy().transpose(0, 2, 3, 1)


def sd3_reference(qk_norm, seed: int = 0):
  torch.manual_seed(seed)
  ref = diffusers.SD3Transformer2DModel(**SD3, qk_norm=qk_norm).eval()
  torch_ref.randomize_(ref, seed=seed + 1)
  return ref


def text_inputs(b=2, length=5, seed=0):
  rng = np.random.default_rng(100 + seed)
  return (
    rng.standard_normal((b, length, SD3['joint_attention_dim'])).astype(np.float32),
    rng.standard_normal((b, SD3['pooled_projection_dim'])).astype(np.float32),
  )


def sd3_forward(ref, x, t, ctx, pooled):
  with torch.no_grad():
    out = ref(
      nchw(x),
      encoder_hidden_states=torch.from_numpy(ctx),
      pooled_projections=torch.from_numpy(pooled),
      timestep=torch.from_numpy(t),
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)


def apply_text(model, params, x, t, ctx, pooled):
  return jitted_apply(model)(params, x, t, context=ctx, pooled=pooled)


def assert_same_params(a, b):
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (a, b))
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (k, u), (_, v) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(k))


# ------------------------------------------------------------------------------------------------- diffusers DiT


@pytest.mark.parametrize('learn_sigma, shard', [(False, None), (True, '40KB')])
def test_dit_from_diffusers_matches_diffusers(tmp_path, learn_sigma, shard):
  ref = dit_reference(learn_sigma)
  ref.save_pretrained(tmp_path, **({'max_shard_size': shard} if shard else {}))
  assert os.path.isfile(tmp_path / f'{WEIGHTS}.index.json') == bool(shard)
  model, params = models.from_diffusers(tmp_path)
  assert isinstance(model, models.DiT) and model.learn_sigma == learn_sigma
  assert (model.depth, model.hidden_size, model.num_heads, model.num_classes) == (2, 32, 4, 10)
  x, t, y = inputs(2, 8, 8, seed=4)
  got = jitted_apply(model)(params, x, t, y)
  assert got.shape == (2, 8, 8, 8 if learn_sigma else 4)
  err = close(got, dit_forward(as_official(ref), x, t, y))
  print(f'DiT learn_sigma={learn_sigma}: max abs {err[0]:.2e}, relative {err[1]:.2e}')


def test_dit_from_diffusers_differs_from_stock_diffusers_only_by_its_constants(tmp_path):
  """Stock diffusers computes other timestep frequencies (and pre-MLP LayerNorm epsilon) than DiT: the imported model
  is the official one, not stock diffusers (random weights amplify the difference: about 50% of the output's
  scale), and equals diffusers once its two constants are DiT's."""
  ref = dit_reference(learn_sigma=True, seed=3)
  ref.save_pretrained(tmp_path)
  model, params = models.from_diffusers(tmp_path)
  x, t, y = inputs(2, 8, 8, seed=5)
  got = jitted_apply(model)(params, x, t, y)
  stock = dit_forward(ref, x, t, y)
  rel = float(np.max(np.abs(got - stock)) / np.max(np.abs(stock)))
  print(f'DiT vs stock diffusers (downscale_freq_shift=1, norm_eps=1e-5): relative {rel:.2e}')
  assert rel > 1e-2
  close(got, dit_forward(as_official(ref), x, t, y))


@pytest.mark.parametrize('torch_dtype, variant', [(torch.float16, 'fp16'), (torch.bfloat16, None)])
def test_dit_half_precision_files(tmp_path, torch_dtype, variant):
  ref = dit_reference(learn_sigma=True)
  ref.to(torch_dtype).save_pretrained(tmp_path, variant=variant)
  model, params = models.from_diffusers(tmp_path, variant=variant, param_dtype=np.float32)
  ref32 = ref.float()
  want = torch_ref.dit_params(ref32, heads=4)  # the half-precision values, widened
  assert_same_params(params, jax.tree.map(np.float32, want))
  _, bf16 = models.from_diffusers(tmp_path, variant=variant, param_dtype=ml_dtypes.bfloat16)
  assert all(a.dtype == ml_dtypes.bfloat16 for a in jax.tree.leaves(bf16))


def test_dit_embedder_copies_must_be_equal(tmp_path):
  ref = dit_reference(learn_sigma=False)
  with torch.no_grad():
    ref.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[3] += 1.0
  ref.save_pretrained(tmp_path)
  with pytest.raises(WeightsMismatchError) as e:
    models.from_diffusers(tmp_path)
  msg = str(e.value)
  assert (
    'transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight (differs from transformer_blocks.0.' in msg
  )
  assert 'one timestep and one label embedder, shared by all blocks' in msg and WEIGHTS in msg
  assert 'timestep_embedder' not in msg


# ------------------------------------------------------------------------------------------------- diffusers SD3


@pytest.mark.parametrize('qk_norm', ['rms_norm', None])
def test_sd3_from_diffusers_matches_diffusers(tmp_path, qk_norm):
  """With `pos_embed_max_size` (16, for a training grid of 4): diffusers' stored table is ours, and so is its centre
  crop at every resolution (square and not)."""
  ref = sd3_reference(qk_norm)
  ref.save_pretrained(tmp_path)
  model, params = models.from_diffusers(tmp_path)
  assert isinstance(model, models.MMDiT) and model.qk_norm == (qk_norm is not None)
  assert (model.pos_embed_max_size, model.pos_embed_base_size, model.context_dim, model.pooled_dim) == (16, 4, 12, 10)
  ctx, pooled = text_inputs(seed=4)
  for h, w in [(8, 8), (12, 6)]:
    x, t, _ = inputs(2, h, w, seed=h)
    got = apply_text(model, params, x, t, ctx, pooled)
    err = close(got, sd3_forward(ref, x, t, ctx, pooled))
    print(f'SD3 qk_norm={qk_norm} {h}x{w}: max abs {err[0]:.2e}, relative {err[1]:.2e}')


def test_sd3_bfloat16_file(tmp_path):
  """A bfloat16 file: its parameters are the rounded ones, and its rounded positional table passes the check."""
  ref = sd3_reference('rms_norm')
  ref.to(torch.bfloat16).save_pretrained(tmp_path)
  _, params = models.from_diffusers(tmp_path)
  assert_same_params(params, torch_ref.sd3_params(ref.float(), heads=4))


def test_sd3_positional_table_is_checked(tmp_path):
  from safetensors.numpy import load_file, save_file

  sd3_reference('rms_norm').save_pretrained(tmp_path)
  state = load_file(str(tmp_path / WEIGHTS))
  state['pos_embed.pos_embed'] = state['pos_embed.pos_embed'][:, ::-1].copy()
  save_file(state, str(tmp_path / WEIGHTS))
  with pytest.raises(WeightsMismatchError, match=r'tensor pos_embed.pos_embed is not the positional embedding.*16x16'):
    models.from_diffusers(tmp_path)


# ------------------------------------------------------------------------------------------------------- export


def test_dit_export_loads_in_diffusers_and_back(tmp_path):
  model = models.DiT(**DIT, learn_sigma=True)
  x, t, y = inputs(2, 8, 8, seed=6)
  params = perturb(nn.unbox(fast_jit(model.init)(jax.random.key(0), x, t, y)['params']), 7)
  models.save_diffusers(tmp_path, model, params, sample_size=8)
  assert sorted(os.listdir(tmp_path)) == ['config.json', WEIGHTS]
  ref = as_official(diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval())
  assert ref.transformer_blocks[1].norm3.eps == 1e-6  # the export asks for DiT's epsilon
  err = close(jitted_apply(model)(params, x, t, y), dit_forward(ref, x, t, y))
  print(f'DiT export: max abs {err[0]:.2e}, relative {err[1]:.2e}')
  again, back = models.from_diffusers(tmp_path)
  assert again == model
  assert_same_params(back, params)


def test_sd3_export_loads_in_diffusers_and_back(tmp_path):
  text = dict(context_dim=12, pooled_dim=10, qk_norm=True)
  model = models.MMDiT(**DIT | dict(num_classes=1000), **text, pos_embed_max_size=16, pos_embed_base_size=4)
  x, t, _ = inputs(2, 8, 8, seed=8)
  ctx, pooled = text_inputs(seed=8)
  init = fast_jit(lambda k: model.init(k, x, t, context=ctx, pooled=pooled))
  params = perturb(nn.unbox(init(jax.random.key(0))['params']), 9)
  models.save_diffusers(tmp_path, model, params, dtype=None)
  ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path).eval()
  assert ref.config.sample_size == 8 and ref.config.qk_norm == 'rms_norm'
  err = close(apply_text(model, params, x, t, ctx, pooled), sd3_forward(ref, x, t, ctx, pooled))
  print(f'SD3 export: max abs {err[0]:.2e}, relative {err[1]:.2e}')
  again, back = models.from_diffusers(tmp_path)
  assert again == model
  assert_same_params(back, params)


def test_export_in_bfloat16(tmp_path):
  model = models.DiT(**DIT)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs()))['params']
  params = jax.tree.map(lambda s: np.full(s.shape, 0.1, np.float32), params)
  models.save_diffusers(tmp_path, model, params, dtype=ml_dtypes.bfloat16)
  header_len = int.from_bytes((tmp_path / WEIGHTS).read_bytes()[:8], 'little')
  header = json.loads((tmp_path / WEIGHTS).read_bytes()[8 : 8 + header_len])
  assert {v['dtype'] for k, v in header.items() if k != '__metadata__'} == {'BF16'}
  _, back = models.from_diffusers(tmp_path)
  assert_same_params(back, jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params))


def test_export_refuses_models_without_a_diffusers_class(tmp_path):
  single = models.DiT(**DIT, modulation='single')
  params = nn.unbox(jax.eval_shape(single.init, jax.random.key(0), *inputs()))['params']
  with pytest.raises(ValueError, match="modulation='single'; only modulation='block'"):
    models.save_diffusers(tmp_path / 'a', single, params)
  class_cond = models.MMDiT(**DIT)
  params = nn.unbox(jax.eval_shape(class_cond.init, jax.random.key(0), *inputs()))['params']
  with pytest.raises(ValueError, match='class-conditional .context_dim=None., which no diffusers class expresses'):
    models.save_diffusers(tmp_path / 'b', class_cond, params)
  with pytest.raises(ValueError, match='params are not those of the given DiT'):
    models.save_diffusers(tmp_path / 'c', models.DiT(**DIT | dict(depth=3)), params)
  assert (
    not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b') and not os.path.exists(tmp_path / 'c')
  )


# ---------------------------------------------------------------------------------------- facebookresearch/DiT


def _module(**children):
  m = torch.nn.Module()
  for name, child in children.items():
    m.add_module(name, child)
  return m


class OfficialDiT(torch.nn.Module):
  """facebookresearch/DiT's `DiT` (models.py) transcribed: the same module names, hence the same state dict, and
  the same forward (timm attention and MLP, adaLN-Zero, the fixed sin-cos `pos_embed` Parameter)."""

  def __init__(self, depth, width, heads, patch, in_channels, num_classes, learn_sigma, grid):
    super().__init__()
    lin, d = torch.nn.Linear, width
    self.heads, self.patch, self.out_channels = heads, patch, in_channels * (2 if learn_sigma else 1)
    self.x_embedder = _module(proj=torch.nn.Conv2d(in_channels, d, patch, stride=patch))
    self.t_embedder = _module(mlp=torch.nn.Sequential(lin(256, d), torch.nn.SiLU(), lin(d, d)))
    self.y_embedder = _module(embedding_table=torch.nn.Embedding(num_classes + 1, d))
    # An independent sin-cos table: diffusers' MAE transcription on integer positions.
    table = diffusers.models.embeddings.get_2d_sincos_pos_embed(d, grid, base_size=grid, output_type='pt')
    self.pos_embed = torch.nn.Parameter(table.float()[None], requires_grad=False)
    self.blocks = torch.nn.ModuleList(
      _module(
        attn=_module(qkv=lin(d, 3 * d), proj=lin(d, d)),
        mlp=_module(fc1=lin(d, 4 * d), fc2=lin(4 * d, d)),
        adaLN_modulation=torch.nn.Sequential(torch.nn.SiLU(), lin(d, 6 * d)),
      )
      for _ in range(depth)
    )
    self.final_layer = _module(
      linear=lin(d, patch * patch * self.out_channels),
      adaLN_modulation=torch.nn.Sequential(torch.nn.SiLU(), lin(d, 2 * d)),
    )

  def forward(self, x, t, y):
    f = torch.nn.functional
    norm = lambda h: f.layer_norm(h, h.shape[-1:], eps=1e-6)
    modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
    half = 128
    freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.y_embedder.embedding_table(y)
    h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    b, n, d = h.shape
    for blk in self.blocks:
      s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
      qkv = blk.attn.qkv(modulate(norm(h), s_msa, c_msa)).reshape(b, n, 3, self.heads, d // self.heads)
      q, k, v = qkv.permute(2, 0, 3, 1, 4)
      a = f.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
      h = h + g_msa[:, None] * blk.attn.proj(a)
      m = blk.mlp.fc2(f.gelu(blk.mlp.fc1(modulate(norm(h), s_mlp, c_mlp)), approximate='tanh'))
      h = h + g_mlp[:, None] * m
    shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    h = self.final_layer.linear(modulate(norm(h), shift, scale))
    g, p = int(n**0.5), self.patch
    h = h.reshape(b, g, g, p, p, self.out_channels)
    return torch.einsum('nhwpqc->nchpwq', h).reshape(b, self.out_channels, g * p, g * p)


def official_reference(learn_sigma=True, seed=0):
  torch.manual_seed(seed)
  ref = OfficialDiT(depth=2, width=32, heads=4, patch=2, in_channels=4, num_classes=10, learn_sigma=learn_sigma, grid=4)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in ref.named_parameters():
      if p.requires_grad:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:]) if p.ndim > 1 else 10.0))
  return ref.eval()


def official_forward(ref, x, t, y):
  with torch.no_grad():
    return ref(nchw(x), torch.from_numpy(t), torch.from_numpy(y).long()).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('learn_sigma', [True, False])
def test_dit_pytorch_checkpoint_matches_official_forward(tmp_path, learn_sigma):
  ref = official_reference(learn_sigma)
  torch.save(ref.state_dict(), tmp_path / 'dit.pt')
  x, t, y = inputs(2, 8, 8, seed=11)
  want = official_forward(ref, x, t, y)
  model, params = models.dit_from_pytorch_checkpoint(tmp_path / 'dit.pt', num_heads=4)
  assert model == models.DiT(**DIT, learn_sigma=learn_sigma)
  err = close(jitted_apply(model)(params, x, t, y), want)
  print(f'DiT .pt learn_sigma={learn_sigma}: max abs {err[0]:.2e}, relative {err[1]:.2e}')
  given, again = models.dit.from_pytorch_checkpoint(tmp_path / 'dit.pt', model=model)
  assert given is model
  assert_same_params(again, params)


def test_dit_pytorch_training_checkpoint_gives_its_ema_weights(tmp_path):
  ema, raw = official_reference(seed=1), official_reference(seed=2)
  torch.save(
    {'model': raw.state_dict(), 'ema': ema.state_dict(), 'opt': {}, 'args': argparse.Namespace(model='DiT-S/2')},
    tmp_path / 'train.pt',
  )
  torch.save(ema.state_dict(), tmp_path / 'ema.pt')
  torch.save({'model': raw.state_dict()}, tmp_path / 'model_only.pt')
  _, from_train = models.dit_from_pytorch_checkpoint(tmp_path / 'train.pt', num_heads=4)
  _, from_ema = models.dit_from_pytorch_checkpoint(tmp_path / 'ema.pt', num_heads=4)
  assert_same_params(from_train, from_ema)
  _, from_raw = models.dit_from_pytorch_checkpoint(tmp_path / 'model_only.pt', num_heads=4)
  assert not np.array_equal(from_raw['y_embedder']['embedding'], from_ema['y_embedder']['embedding'])


def test_dit_pytorch_checkpoint_heads_from_the_paper_sizes_or_the_caller(tmp_path):
  ref = official_reference()
  torch.save(ref.state_dict(), tmp_path / 'dit.pt')
  with pytest.raises(
    ValueError, match=r"dit.pt': a DiT of depth 2 and width 32 is none of the paper sizes.*num_heads="
  ):
    models.dit_from_pytorch_checkpoint(tmp_path / 'dit.pt')
  # DiT-S/2's shapes (traced, nothing allocated) give its 6 heads.
  shapes = convert_dit.param_shapes(models.DiT_S_2(learn_sigma=True))
  state = convert_dit.C.state_shapes(convert_dit.official_rules(models.DiT_S_2()), shapes)
  fake = {n: np.zeros(s, np.float32) for n, s in state.items() if n.startswith(('x_embedder', 'y_embedder', 'final'))}
  fake |= {f'blocks.{i}.attn.qkv.weight': np.zeros((1152, 384)) for i in range(12)}
  fake['blocks.0.mlp.fc1.weight'] = np.zeros((1536, 384))
  assert convert_dit._infer_model(fake, 'x.pt', None) == models.DiT_S_2(learn_sigma=True)


def test_dit_pytorch_checkpoint_checks_pos_embed_and_names_every_problem(tmp_path):
  ref = official_reference()
  state = ref.state_dict()
  state['pos_embed'] = state['pos_embed'].flip(1)
  torch.save(state, tmp_path / 'pos.pt')
  with pytest.raises(WeightsMismatchError, match=r"pos.pt' \(facebookresearch/DiT layout\): tensor pos_embed is not"):
    models.dit_from_pytorch_checkpoint(tmp_path / 'pos.pt', num_heads=4)
  state = ref.state_dict()
  del state['blocks.1.mlp.fc2.bias']
  state['blocks.0.attn.qkv.weight'] = state['blocks.0.attn.qkv.weight'][:, :16]
  state['blocks.0.extra.weight'] = torch.zeros(2)
  torch.save(state, tmp_path / 'bad.pt')
  with pytest.raises(WeightsMismatchError) as e:
    models.dit_from_pytorch_checkpoint(tmp_path / 'bad.pt', model=models.DiT(**DIT, learn_sigma=True))
  msg = str(e.value)
  assert "bad.pt' (facebookresearch/DiT layout)" in msg
  assert '1 missing tensor(s):\n    blocks.1.mlp.fc2.bias (32,)' in msg
  assert '1 unexpected tensor(s):\n    blocks.0.extra.weight (2,)' in msg
  assert 'blocks.0.attn.qkv.weight: file has (96, 16), model expects (96, 32)' in msg


def test_pt_files_that_are_not_state_dicts(tmp_path):
  torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
  with pytest.raises(ValueError, match=r"tensor.pt' holds a Tensor, expected a state dict"):
    models.dit_from_pytorch_checkpoint(tmp_path / 'tensor.pt', num_heads=4)
  (tmp_path / 'junk.pt').write_bytes(b'not a torch file at all')
  with pytest.raises(ValueError, match=r"junk.pt' could not be read as a torch file with weights_only=True"):
    models.dit_from_pytorch_checkpoint(tmp_path / 'junk.pt', num_heads=4)
  torch.save({'step': 3, 'weights': {'a': torch.zeros(1)}}, tmp_path / 'nested.pt')
  with pytest.raises(ValueError, match=r"nested.pt' is not a flat state dict .*step \(int\), weights \(dict\)"):
    models.dit_from_pytorch_checkpoint(tmp_path / 'nested.pt', num_heads=4)
  torch.save({'a': torch.zeros(1)}, tmp_path / 'other.pt')
  with pytest.raises(WeightsMismatchError, match=r"other.pt' is not a facebookresearch/DiT state dict"):
    models.dit_from_pytorch_checkpoint(tmp_path / 'other.pt', num_heads=4)


# ---------------------------------------------------------------------------------------------------- bad files


@pytest.fixture
def dit_folder(tmp_path):
  model = models.DiT(**DIT)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs()))['params']
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params)
  models.save_diffusers(tmp_path, model, params, sample_size=8)
  return tmp_path


def test_truncated_safetensors(dit_folder):
  raw = (dit_folder / WEIGHTS).read_bytes()
  (dit_folder / WEIGHTS).write_bytes(raw[: len(raw) - 100])
  with pytest.raises(ValueError, match=rf"{WEIGHTS}': tensor .* has inconsistent offsets \(truncated file\?\)"):
    models.from_diffusers(dit_folder)


def test_missing_unexpected_and_misshaped_tensors_in_one_error(dit_folder):
  from safetensors.numpy import load_file, save_file

  state = load_file(str(dit_folder / WEIGHTS))
  del state['transformer_blocks.1.ff.net.2.bias']
  state['transformer_blocks.0.attn1.to_k.weight'] = np.zeros((32, 31), np.float32)
  state['transformer_blocks.0.attn2.to_k.weight'] = np.zeros((32, 32), np.float32)
  save_file(state, str(dit_folder / WEIGHTS))
  with pytest.raises(WeightsMismatchError) as e:
    models.from_diffusers(dit_folder)
  msg = str(e.value)
  assert f"the DiTTransformer2DModel of '{dit_folder / 'config.json'}' (weights: '{dit_folder / WEIGHTS}')" in msg
  assert '1 missing tensor(s):\n    transformer_blocks.1.ff.net.2.bias (32,)' in msg
  assert '1 unexpected tensor(s):\n    transformer_blocks.0.attn2.to_k.weight (32, 32)' in msg
  assert 'transformer_blocks.0.attn1.to_k.weight: file has (32, 31), model expects (32, 32)' in msg


def test_tensor_in_two_shards(dit_folder):
  from safetensors.numpy import load_file, save_file

  state = load_file(str(dit_folder / WEIGHTS))
  names = sorted(state)
  first, second = {n: state[n] for n in names[:10]}, {n: state[n] for n in names[9:]}
  save_file(first, str(dit_folder / 'a.safetensors'))
  save_file(second, str(dit_folder / 'b.safetensors'))
  index = {'weight_map': {n: 'a.safetensors' for n in first} | {n: 'b.safetensors' for n in second}}
  (dit_folder / f'{WEIGHTS}.index.json').write_text(json.dumps(index))
  (dit_folder / WEIGHTS).unlink()
  with pytest.raises(WeightsMismatchError) as e:
    models.from_diffusers(dit_folder)
  assert f"the 2 shard(s) of '{dit_folder / WEIGHTS}.index.json'" in str(e.value)
  assert (
    f'1 given twice tensor(s):\n    {names[9]} (in b.safetensors) (same tensor as {names[9]} (in a.safetensors))'
    in str(e.value)
  )


def test_config_errors_name_the_file_and_field(dit_folder):
  config = json.loads((dit_folder / 'config.json').read_text())

  def load_with(**fields):
    (dit_folder / 'config.json').write_text(json.dumps(config | fields))
    models.from_diffusers(dit_folder)

  with pytest.raises(ValueError, match=r"config.json': _class_name 'UNet2DConditionModel' is not a denoiser .*"):
    load_with(_class_name='UNet2DConditionModel')
  with pytest.raises(ValueError, match=r'DiTTransformer2DModel.*SD3Transformer2DModel'):
    load_with(_class_name='UNet2DConditionModel')
  with pytest.raises(
    ValueError, match=r"config.json': not a DiT .*activation_fn='gelu' \(expected 'gelu-approximate'\)"
  ):
    load_with(activation_fn='gelu')
  with pytest.raises(ValueError, match=r'out_channels=12 \(expected in_channels=4, or twice'):
    load_with(out_channels=12)
  # The hub's DiT folders predate DiTTransformer2DModel: diffusers maps this legacy class to it, and so do we.
  load_with(_class_name='Transformer2DModel', cross_attention_dim=None, use_linear_projection=False)
  with pytest.raises(ValueError, match=r"_class_name 'Transformer2DModel' is not a denoiser"):
    load_with(_class_name='Transformer2DModel', norm_type='layer_norm')


def test_sd3_config_errors_name_the_field(tmp_path):
  config = dict(SD3, _class_name='SD3Transformer2DModel', qk_norm=None, dual_attention_layers=[0])
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config.json': not an SD3 transformer .*dual_attention_layers=\[0\].*MMDiT-X"):
    models.from_diffusers(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(config | dict(dual_attention_layers=[], caption_projection_dim=48)))
  with pytest.raises(ValueError, match=r'caption_projection_dim=48 \(expected .* = 32'):
    models.from_diffusers(tmp_path)


def test_mmdit_refuses_grids_larger_than_its_positional_table():
  model = models.MMDiT(**DIT, context_dim=12, pooled_dim=10, pos_embed_max_size=4, pos_embed_base_size=2)
  x, t, _ = inputs(1, 10, 8)
  ctx, pooled = text_inputs(1)
  with pytest.raises(
    ValueError, match=r'a 5x4 patch grid does not fit the 4x4 positional table \(pos_embed_max_size\)'
  ):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context=ctx, pooled=pooled))
