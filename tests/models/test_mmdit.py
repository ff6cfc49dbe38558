"""MMDiT: identity at init, outputs and parameter counts against diffusers' SD3 transformer, joint attention, QK-norm,
class and text conditioning, conditioning errors, bf16, remat, no recompilation."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import models
from lpl_jax.models import mmdit
from tests.models import torch_ref
from tests.models.common import count, fast_jit, inputs, jitted_apply, perturb

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
TEXT = dict(context_dim=12, pooled_dim=10)


def text_inputs(b=2, length=5, seed=0):
  rng = np.random.default_rng(100 + seed)
  return (
    rng.standard_normal((b, length, TEXT['context_dim'])).astype(np.float32),
    rng.standard_normal((b, TEXT['pooled_dim'])).astype(np.float32),
  )


@pytest.fixture(scope='module')
def class_model():
  model = models.MMDiT(**TINY)
  return model, nn.unbox(fast_jit(model.init)(jax.random.key(0), *inputs())['params'])


@pytest.fixture(scope='module')
def text_model():
  """Text-conditional with QK-norm, params moved off their init."""
  model = models.MMDiT(**TINY, **TEXT, qk_norm=True)
  x, t, _ = inputs()
  ctx, pooled = text_inputs()
  params = fast_jit(model.init)(jax.random.key(0), x, t, context=ctx, pooled=pooled)['params']
  return model, perturb(nn.unbox(params), 1)


def apply_text(model):
  apply = jitted_apply(model)
  return lambda p, x, t, ctx, pooled: apply(p, x, t, context=ctx, pooled=pooled)


@pytest.mark.parametrize('context_pre_only', [False, True])
def test_block_is_identity_at_init(context_pre_only):
  block = models.MMDiTBlock(hidden_size=32, num_heads=4, qk_norm=True, context_pre_only=context_pre_only)
  rng = np.random.default_rng(2)
  x, ctx, c = (rng.standard_normal(s).astype(np.float32) for s in [(2, 16, 32), (2, 3, 32), (2, 32)])
  params = fast_jit(block.init)(jax.random.key(0), x, ctx, c)
  x_out, ctx_out = fast_jit(block.apply)(params, x, ctx, c)
  np.testing.assert_array_equal(x_out, x)
  if context_pre_only:
    assert ctx_out is None and set(params['params']['context']) == {'adaLN_modulation', 'qkv', 'q_norm', 'k_norm'}
  else:
    np.testing.assert_array_equal(ctx_out, ctx)


def test_outputs_zeros_at_init(class_model):
  model, params = class_model
  out = jitted_apply(model)(params, *inputs(seed=3))
  assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize('text', [False, True])
@pytest.mark.parametrize('patch_size, h, w', [(2, 8, 8), (2, 6, 10), (4, 16, 8), (8, 16, 32)])
def test_output_shapes(patch_size, h, w, text):
  model = models.MMDiT(**TINY | dict(patch_size=patch_size, num_class_tokens=2), **(TEXT if text else {}))
  x, t, y = inputs(3, h, w)
  kw = dict(zip(('context', 'pooled'), text_inputs(3, length=7))) if text else dict(y=y)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **kw))
  out = jax.eval_shape(lambda p: model.apply(p, x, t, **kw), params)
  assert out.shape == (3, h, w, 4) and out.dtype == jnp.float32
  if not text:  # one row per class plus the null class, two tokens per row
    assert params['params']['context_embedder']['embedding'].value.shape == (11, 64)


def sd3_reference(num_layers=2, qk_norm='rms_norm', device=None):
  import torch
  from diffusers import SD3Transformer2DModel

  with torch.device(device or 'cpu'):
    return SD3Transformer2DModel(
      sample_size=8,
      patch_size=2,
      in_channels=4,
      num_layers=num_layers,
      attention_head_dim=8,
      num_attention_heads=4,
      joint_attention_dim=12,
      caption_projection_dim=32,
      pooled_projection_dim=10,
      out_channels=4,
      pos_embed_max_size=None,
      qk_norm=qk_norm,
    ).eval()


def test_matches_diffusers_sd3_outputs(text_model):
  import torch

  model, _ = text_model
  torch.manual_seed(0)
  ref = sd3_reference()
  torch_ref.randomize_(ref, seed=6)
  x, t, _ = inputs(seed=4)
  ctx, pooled = text_inputs(seed=4)
  with torch.no_grad():
    want = ref(
      torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      encoder_hidden_states=torch.from_numpy(ctx),
      pooled_projections=torch.from_numpy(pooled),
      timestep=torch.from_numpy(t),
    ).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  got = apply_text(model)(torch_ref.sd3_params(ref, heads=4), x, t, ctx, pooled)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('qk_norm', [False, True])
def test_parameter_count_matches_diffusers(qk_norm):
  model = models.MMDiT(**TINY, **TEXT, qk_norm=qk_norm)
  x, t, _ = inputs()
  ctx, pooled = text_inputs()
  ours = count(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context=ctx, pooled=pooled)))
  ref = sd3_reference(num_layers=2, qk_norm='rms_norm' if qk_norm else None, device='meta')
  assert ours == sum(p.numel() for p in ref.parameters())


def test_paper_config_parameter_count():
  """The paper's 28 x 1536 model: the text variant equals SD3's transformer of that size exactly; both counts are
  the ones the module docstring reports (and explains against the paper's 796M)."""
  import torch
  from diffusers import SD3Transformer2DModel

  x, t, y = inputs(1, 32, 32)
  class_count = count(jax.eval_shape(lambda: models.MMDiT_paper().init(jax.random.key(0), x, t, y)))
  text = models.MMDiT_paper(context_dim=4096, pooled_dim=2048)
  ctx, pooled = jnp.zeros((1, 77, 4096)), jnp.zeros((1, 2048))
  text_count = count(jax.eval_shape(lambda: text.init(jax.random.key(0), x, t, context=ctx, pooled=pooled)))
  with torch.device('meta'):
    ref = SD3Transformer2DModel(
      sample_size=32,
      patch_size=2,
      in_channels=4,
      num_layers=28,
      attention_head_dim=64,
      num_attention_heads=24,
      joint_attention_dim=4096,
      caption_projection_dim=1536,
      pooled_projection_dim=2048,
      out_channels=4,
    )
  assert text_count == sum(p.numel() for p in ref.parameters())
  print(f'MMDiT_paper: class-conditional {class_count:,}, text-conditional {text_count:,}')
  doc = ' '.join(mmdit.__doc__.split())
  assert f'{class_count:,}' in doc and f'{text_count:,}' in doc


def test_joint_attention_mixes_streams(text_model):
  """The context reaches the image tokens only through the joint attention (t and pooled are held fixed)."""
  model, params = text_model
  x, t, _ = inputs(seed=5)
  ctx, pooled = text_inputs(seed=5)
  apply = apply_text(model)
  base = apply(params, x, t, ctx, pooled)
  np.testing.assert_array_equal(apply(params, x, t, ctx, pooled), base)
  changed = apply(params, x, t, ctx + 1.0, pooled)
  assert float(jnp.max(jnp.abs(changed - base))) > 1e-3 * float(jnp.max(jnp.abs(base)))


def test_qk_norm_makes_attention_invariant_to_query_key_scale(text_model):
  """Scaling every stream's query and key projections by 10 leaves a QK-normed model unchanged (RMSNorm divides the
  scale out) and changes the same weights without QK-norm."""
  model, params = text_model

  def scale_qk(p):
    p = jax.tree.map(np.array, p)
    for i in range(TINY['depth']):
      for stream in ('image', 'context'):
        qkv = p[f'blocks_{i}'][stream]['qkv']
        qkv['kernel'][:, :2] *= 10.0
        qkv['bias'][:2] *= 10.0
    return p

  x, t, _ = inputs(seed=6)
  ctx, pooled = text_inputs(seed=6)
  apply = apply_text(model)
  np.testing.assert_allclose(
    apply(scale_qk(params), x, t, ctx, pooled), apply(params, x, t, ctx, pooled), rtol=1e-4, atol=1e-5
  )
  plain = models.MMDiT(**TINY, **TEXT)
  no_norm = jax.tree.map(lambda a: a, params)
  for i in range(TINY['depth']):
    for stream in ('image', 'context'):
      del no_norm[f'blocks_{i}'][stream]['q_norm'], no_norm[f'blocks_{i}'][stream]['k_norm']
  apply_plain = apply_text(plain)
  base = apply_plain(no_norm, x, t, ctx, pooled)
  assert float(jnp.max(jnp.abs(apply_plain(scale_qk(no_norm), x, t, ctx, pooled) - base))) > 1e-3


TEXT_KW = dict(zip(('context', 'pooled'), text_inputs()))


@pytest.mark.parametrize(
  'text, kwargs, match',
  [
    (False, dict(), r'class-conditional \(context_dim=None\): pass class labels y'),
    (False, dict(y=np.zeros(2, np.int32)) | TEXT_KW, 'takes labels y .* it was given context/pooled'),
    (False, dict(y=np.zeros(2, np.float32)), r'class labels y must be integers of shape \[B\] = \[2\]'),
    (True, dict(y=np.zeros(2, np.int32)) | TEXT_KW, r'text-conditional \(context_dim=12\) .* not class labels y'),
    (True, dict(pooled=TEXT_KW['pooled']), r'text-conditional: pass context \[B, L, 12\]'),
    (True, dict(context=TEXT_KW['context']), r'pooled_dim\] = \[2, 10\], got none'),
    (
      True,
      dict(context=np.zeros((2, 5, 7), np.float32), pooled=TEXT_KW['pooled']),
      r'context must be \[B, L, context_dim\] = \[2, L, 12\], got \(2, 5, 7\)',
    ),
    (True, dict(context=TEXT_KW['context'], pooled=np.zeros((2, 3), np.float32)), r'got \(2, 3\)'),
  ],
)
def test_wrong_conditioning_raises(text, kwargs, match):
  model = models.MMDiT(**TINY, **(TEXT if text else {}))
  x, t, _ = inputs()
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **kwargs))


def test_pooled_is_rejected_without_pooled_dim():
  model = models.MMDiT(**TINY, context_dim=12)
  x, t, _ = inputs()
  with pytest.raises(ValueError, match=r'no pooled conditioning \(pooled_dim=None\)'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **TEXT_KW))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t, context=TEXT_KW['context'])[0])
  assert out.shape == x.shape


def test_bf16_compute_close_to_float32(text_model):
  """As for DiT (bf16 matmuls; float32 residual streams, norms, softmax): measured max error about 1% of the
  output's largest magnitude; the bound is 3%."""
  model, params = text_model
  x, t, _ = inputs(seed=7)
  ctx, pooled = text_inputs(seed=7)
  f32 = apply_text(model)(params, x, t, ctx, pooled)
  bf16 = apply_text(models.MMDiT(**TINY, **TEXT, qk_norm=True, dtype=jnp.bfloat16))(params, x, t, ctx, pooled)
  assert bf16.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(bf16 - f32)) / jnp.max(jnp.abs(f32)))
  assert err < 0.03, err


def test_remat_gives_identical_values_and_gradients(text_model):
  model, params = text_model
  x, t, _ = inputs(seed=8)
  ctx, pooled = text_inputs(seed=8)

  def loss(m):
    return lambda p: jnp.mean(jnp.square(m.apply({'params': p}, x, t, context=ctx, pooled=pooled)))

  remat = models.MMDiT(**TINY, **TEXT, qk_norm=True, remat=True)
  v_plain, g_plain = fast_jit(jax.value_and_grad(loss(model)))(params)
  v_remat, g_remat = fast_jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(v_remat, v_plain, rtol=1e-6)
  chex.assert_trees_all_close(g_remat, g_plain, rtol=1e-5, atol=1e-7)
  assert 'remat' in str(jax.make_jaxpr(jax.grad(loss(remat)))(params))


def test_no_recompilation_across_new_values(text_model):
  model, params = text_model

  @fast_jit
  @chex.assert_max_traces(n=1)
  def apply(p, x, t, ctx, pooled):
    return model.apply({'params': p}, x, t, context=ctx, pooled=pooled)

  for seed in range(3):
    apply(perturb(params, seed), *inputs(seed=seed)[:2], *text_inputs(seed=seed))
