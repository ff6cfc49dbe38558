"""adaLN-single (`modulation='single'`, PixArt-alpha section 2.3) in DiT and MMDiT: parameter counts against their
formula and the paper-size counts of the module docstring, block outputs against a NumPy transcription, gradients,
the config field and its errors. `modulation='block'` is what the other test files check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import models
from lpl_jax.models import mmdit
from tests.models.common import count, fast_jit, inputs, perturb

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
PAPER = dict(patch_size=2, hidden_size=1536, depth=28, num_heads=24, num_classes=1000)


def formula(kind: str, *, depth, hidden_size, num_heads, patch_size, num_classes, mlp_ratio=4.0, tokens=1, c=4):
  """Parameters of a class-conditional model with adaLN-single, written from the architecture.

  Per block and stream: qkv 3 D^2 + 3 D, output D^2 + D, MLP 2 D H + H + D, table 6 D. Shared: SiLU + Linear
  D -> 6 D. Embedders: patch (p^2 C + 1) D, timestep 256 D + D + D^2 + D, class table (K + 1) D (and, in MMDiT, the
  context table (K + 1) T D). Final layer: table 2 D, Linear D p^2 C + p^2 C. MMDiT's last context stream is
  pre-only: qkv and a 2 x D table.
  """
  d, h, pc = hidden_size, int(hidden_size * mlp_ratio), patch_size**2 * c
  stream = 4 * d * d + 4 * d + 2 * d * h + h + d + 6 * d
  shared = 6 * d * d + 6 * d
  embed = (pc + 1) * d + (256 * d + d + d * d + d) + (num_classes + 1) * d
  final = 2 * d + d * pc + pc
  if kind == 'dit':
    return depth * stream + shared + embed + final
  pre_only = 3 * d * d + 3 * d + 2 * d
  return (2 * depth - 1) * stream + pre_only + shared + embed + (num_classes + 1) * tokens * d + final


def n_params(model, side=8):
  x, t, y = inputs(1, side, side)
  return count(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y)))


@pytest.mark.parametrize('mlp_ratio, tokens', [(4.0, 1), (2.5, 3)])
def test_parameter_count_matches_formula(mlp_ratio, tokens):
  kw = dict(TINY, mlp_ratio=mlp_ratio)
  assert n_params(models.DiT(**kw, modulation='single')) == formula('dit', **kw)
  mm = models.MMDiT(**kw, num_class_tokens=tokens, modulation='single')
  assert n_params(mm) == formula('mmdit', **kw, tokens=tokens)


def test_paper_size_counts_are_the_docstrings():
  """At 28 x 1536: (a) two-stream MMDiT and (b) single-stream DiT with adaLN-single, (c) = (b) plus the context
  stream's class-token table (an MMDiT whose streams share weights); the module docstring states each count."""
  a = n_params(models.MMDiT_paper(num_classes=1000, modulation='single'), side=32)
  b = n_params(models.DiT(**PAPER, modulation='single'), side=32)
  assert a == formula('mmdit', **PAPER) == 1_585_537_552
  assert b == formula('dit', **PAPER) == 811_880_464
  c = b + 1001 * 1536
  print(f'adaLN-single at 28 x 1536: (a) MMDiT {a:,}, (b) DiT {b:,}, (c) shared streams {c:,}; paper 796M')
  doc = ' '.join(mmdit.__doc__.split())
  assert all(f'{n:,}' in doc for n in (a, b, c, b - (6 * 1536**2 + 6 * 1536)))
  assert f'{b:,}' in ' '.join(models.dit.__doc__.split())
  assert abs(b / 796e6 - 1) > 0.01  # why the configs keep the two-stream default (configs/imagenet.py)


def test_block_modulation_keeps_its_parameter_tree():
  """`'block'` (the default) creates no shared Linear and no tables: its params (and so checkpoints) are as before."""
  x, t, y = inputs(1)
  for model in (models.DiT(**TINY), models.MMDiT(**TINY)):
    names = {
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, t, y))
      )[0]
    }
    assert not any('adaLN_single' in n or 'scale_shift_table' in n for n in names)
    assert any("['blocks_0']" in n and "['adaLN_modulation']['linear']" in n for n in names)


# ------------------------------------------------------------------------------------------------------------------
# NumPy transcription (float64), written from PixArt-alpha's block and T2IFinalLayer and SD3's joint attention.


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_layer_norm(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def np_linear(p, x):
  return x @ p['kernel'] + p['bias']


def np_modulate(x, shift, scale):
  return x * (1.0 + scale[:, None]) + shift[:, None]


def np_cond(params, t, y):
  """`c = MLP(sinusoid(t)) + class_table[y]` (DiT's embedders)."""
  half = 128
  freqs = np.exp(-np.log(10_000.0) * np.arange(half) / half)
  args = t.astype(np.float64)[:, None] * freqs
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  te = params['t_embedder']
  return np_linear(te['fc2'], np_silu(np_linear(te['fc1'], emb))) + params['y_embedder']['embedding'][y]


def np_adaln_single(params, c, table):
  """adaLN-single: `chunk_i(Linear(SiLU(c))) + table[i]` for the first `len(table)` chunks."""
  shared = np.split(np_linear(params['adaLN_single']['linear'], np_silu(c)), 6, axis=-1)
  return [shared[i] + table[i] for i in range(len(table))]


def np_qkv(p, h):
  out = np.einsum('bld,dthk->blthk', h, p['qkv']['kernel']) + p['qkv']['bias']
  return out[:, :, 0], out[:, :, 1], out[:, :, 2]


def np_attention(q, k, v):
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhqk,bkhd->bqhd', w / w.sum(-1, keepdims=True), v)


def np_post(p, x, attn, mods):
  _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
  x = x + gate_msa[:, None] * (np.einsum('blhk,hkd->bld', attn, p['proj']['kernel']) + p['proj']['bias'])
  h = np_modulate(np_layer_norm(x), shift_mlp, scale_mlp)
  mlp = np_linear(p['mlp']['fc2'], np_gelu_tanh(np_linear(p['mlp']['fc1'], h)))
  return x + gate_mlp[:, None] * mlp


def np_dit_block(p, x, mods):
  q, k, v = np_qkv(p, np_modulate(np_layer_norm(x), mods[0], mods[1]))
  return np_post(p, x, np_attention(q, k, v), mods)


def np_final(p, x, c):
  """PixArt-alpha's T2IFinalLayer: shift, scale = table + c (no Linear), then the output Linear."""
  table = p['adaLN_modulation']['scale_shift_table']
  return np_linear(p['linear'], np_modulate(np_layer_norm(x), table[0] + c, table[1] + c))


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def capture(model, params, *args):
  """The model's output and every submodule's output (`capture_intermediates`)."""
  fn = lambda p, *a: model.apply({'params': p}, *a, capture_intermediates=True, mutable=['intermediates'])
  out, state = fast_jit(fn)(params, *args)
  return out, jax.tree.map(np.asarray, state['intermediates'])


def assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dit_block_matches_numpy_adaln_single():
  """Blocks 1 and 2 of a 3-block DiT (random weights) against NumPy, each from the previous block's output with the
  modulation shared Linear(SiLU(c)) + its own table; then the final layer (table + c)."""
  model = models.DiT(**TINY | dict(depth=3), modulation='single')
  x, t, y = inputs(seed=11)
  params = perturb(nn.unbox(fast_jit(model.init)(jax.random.key(0), x, t, y)['params']), 12)
  _, inter = capture(model, params, x, t, y)
  p = f64(params)
  c = np_cond(p, t, y)
  for i in (1, 2):
    block = p[f'blocks_{i}']
    mods = np_adaln_single(p, c, block['adaLN_modulation']['scale_shift_table'])
    want = np_dit_block(block, inter[f'blocks_{i - 1}']['__call__'][0].astype(np.float64), mods)
    assert_close(inter[f'blocks_{i}']['__call__'][0], want)
  want = np_final(p['final_layer'], inter['blocks_2']['__call__'][0].astype(np.float64), c)
  assert_close(inter['final_layer']['__call__'][0], want)


def test_mmdit_block_matches_numpy_adaln_single():
  """Blocks 1 (two full streams) and 2 (context pre-only: shift and scale from the shared vectors plus its 2 x D
  table) of a 3-block MMDiT with two class tokens, against NumPy joint attention over [context; image]."""
  model = models.MMDiT(**TINY | dict(depth=3, num_class_tokens=2), modulation='single')
  x, t, y = inputs(seed=13)
  params = perturb(nn.unbox(fast_jit(model.init)(jax.random.key(0), x, t, y)['params']), 14)
  _, inter = capture(model, params, x, t, y)
  p = f64(params)
  c = np_cond(p, t, y)
  tokens, ctx = (a.astype(np.float64) for a in inter['blocks_0']['__call__'][0])
  for i in (1, 2):
    block, pre_only = p[f'blocks_{i}'], i == 2
    mods_x = np_adaln_single(p, c, block['image']['adaLN_modulation']['scale_shift_table'])
    mods_c = np_adaln_single(p, c, block['context']['adaLN_modulation']['scale_shift_table'])
    assert len(mods_c) == (2 if pre_only else 6)
    qkv_x = np_qkv(block['image'], np_modulate(np_layer_norm(tokens), mods_x[0], mods_x[1]))
    qkv_c = np_qkv(block['context'], np_modulate(np_layer_norm(ctx), mods_c[0], mods_c[1]))
    attn = np_attention(*(np.concatenate([a, b], axis=1) for a, b in zip(qkv_c, qkv_x)))
    n = ctx.shape[1]
    want_x = np_post(block['image'], tokens, attn[:, n:], mods_x)
    got_x, got_c = inter[f'blocks_{i}']['__call__'][0]
    assert_close(got_x, want_x)
    if pre_only:
      assert got_c is None
    else:
      want_c = np_post(block['context'], ctx, attn[:, :n], mods_c)
      assert_close(got_c, want_c)
      tokens, ctx = got_x.astype(np.float64), got_c.astype(np.float64)
  want = np_final(p['final_layer'], inter['blocks_2']['__call__'][0][0].astype(np.float64), c)
  assert_close(inter['final_layer']['__call__'][0], want)


def test_output_is_zero_at_init_and_tables_follow_pixart():
  """The zero final projection keeps the output 0 at init; tables are randn / sqrt(D), the shared Linear N(0, 0.02)."""
  model = models.DiT(**TINY | dict(hidden_size=256, num_heads=4, depth=1), modulation='single')
  x, t, y = inputs(seed=3)
  params = nn.unbox(fast_jit(model.init)(jax.random.key(0), x, t, y)['params'])
  np.testing.assert_array_equal(fast_jit(model.apply)({'params': params}, x, t, y), 0.0)
  table = np.asarray(params['blocks_0']['adaLN_modulation']['scale_shift_table'])
  assert table.shape == (6, 256) and abs(table.std() * 16 - 1) < 0.1
  kernel = np.asarray(params['adaLN_single']['linear']['kernel'])
  assert kernel.shape == (256, 6 * 256) and abs(kernel.std() / 0.02 - 1) < 0.05
  np.testing.assert_array_equal(params['adaLN_single']['linear']['bias'], 0.0)


@pytest.mark.parametrize('kind', ['dit', 'mmdit'])
def test_forward_and_gradient_with_remat(kind):
  """Value and gradient of a squared-error loss: finite, reaching the shared Linear and every table, and the same
  with per-block remat."""
  cls = models.DiT if kind == 'dit' else models.MMDiT
  x, t, y = inputs(seed=4)
  target = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
  plain = cls(**TINY, modulation='single')
  params = perturb(nn.unbox(fast_jit(plain.init)(jax.random.key(0), x, t, y)['params']), 6)

  def loss(m):
    return lambda p: jnp.mean(jnp.square(m.apply({'params': p}, x, t, y) - target))

  v, g = fast_jit(jax.value_and_grad(loss(plain)))(params)
  v_remat, g_remat = fast_jit(jax.value_and_grad(loss(cls(**TINY, modulation='single', remat=True))))(params)
  np.testing.assert_allclose(v_remat, v, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_remat, g)
  flat = {jax.tree_util.keystr(path): np.asarray(a) for path, a in jax.tree_util.tree_flatten_with_path(g)[0]}
  assert all(np.isfinite(a).all() for a in flat.values())
  tables = [k for k in flat if 'scale_shift_table' in k]
  assert len(tables) == (TINY['depth'] + 1 if kind == 'dit' else 2 * TINY['depth'] + 1)
  for name in tables + [k for k in flat if 'adaLN_single' in k]:
    assert np.abs(flat[name]).max() > 0, name


@pytest.mark.parametrize('cls', [models.DiT, models.MMDiT])
def test_unknown_modulation_raises(cls):
  x, t, y = inputs(1)
  with pytest.raises(ValueError, match=r"modulation='shared'; expected 'block' .* or 'single'"):
    jax.eval_shape(lambda: cls(**TINY, modulation='shared').init(jax.random.key(0), x, t, y))


def test_config_field_builds_the_model_and_is_validated():
  """`model.modulation` reaches the denoiser that the trainer builds; an unknown value is a ConfigError naming it."""
  from configs import imagenet
  from lpl_jax.train import build
  from lpl_jax.train.config import ConfigError, Experiment
  from lpl_jax.train.validate import validate

  c = imagenet.get_config('pretrain256')
  assert c.model.modulation == 'block'
  c.model.kind, c.model.modulation = 'dit', 'single'
  exp = Experiment.from_config_dict(c)
  validate(exp, num_devices=8, check_files=False)
  model = build.make_denoiser(exp, 4)
  assert isinstance(model, models.DiT) and model.modulation == 'single' and model.hidden_size == 1536
  c.model.modulation = 'per_block'
  with pytest.raises(ConfigError, match=r"model.modulation='per_block'; expected 'block'"):
    validate(Experiment.from_config_dict(c), num_devices=8, check_files=False)
