"""Scan over layers (`scan_layers=True`, `lpl_jax.models.scan`): the scanned DiT and MMDiT compute the function of
the unscanned ones with the same (converted) params, forward and backward; the param layouts convert exactly both
ways, boxed logical names included; the importers' unscanned weights reach a scanned config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import models
from lpl_jax.models import axes, scan
from tests.models.common import count, fast_jit, inputs, perturb

TINY = dict(patch_size=2, hidden_size=32, depth=3, num_heads=4)
TEXT = dict(context_dim=12, pooled_dim=6)


def make(kind: str, modulation: str, remat: bool, **kw):
  """`(unscanned model, args, kwargs)` of a tiny class- or text-conditional denoiser."""
  x, t, y = inputs(2, 8, 8)
  if kind == 'dit':
    return models.DiT(**TINY, num_classes=10, modulation=modulation, remat=remat, **kw), (x, t, y), {}
  if kind == 'mmdit':
    return models.MMDiT(**TINY, num_classes=10, modulation=modulation, remat=remat, **kw), (x, t, y), {}
  rng = np.random.default_rng(1)
  cond = dict(
    context=rng.standard_normal((2, 5, TEXT['context_dim'])).astype(np.float32),
    pooled=rng.standard_normal((2, TEXT['pooled_dim'])).astype(np.float32),
  )
  return models.MMDiT(**TINY, **TEXT, modulation=modulation, remat=remat, **kw), (x, t), cond


def host_params(model, args, kw, seed=3):
  """Random NumPy params of `model` (nothing is initialised or compiled: shapes from `jax.eval_shape`)."""
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw)['params']))
  return perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), seed)


def loss_and_grads(model):
  """`(params, args, kw) -> ((loss, output), grads)` of a denoising MSE, as the train step differentiates it."""

  def loss(params, args, kw):
    out = model.apply({'params': params}, *args, **kw)
    return jnp.mean((out - 0.5) ** 2), out

  return fast_jit(jax.value_and_grad(loss, has_aux=True))


# Every combination; those past the first of each kind with both modulations and both remat settings are slow (two
# compilations each).
FAST = {
  ('dit', 'block', False),
  ('dit', 'block', True),
  ('dit', 'single', False),
  ('dit', 'single', True),
  ('mmdit', 'block', False),
  ('mmdit', 'single', True),
  ('mmdit_text', 'block', True),
  ('mmdit_text', 'single', False),
}
CASES = [
  pytest.param(kind, modulation, remat, marks=() if (kind, modulation, remat) in FAST else pytest.mark.slow)
  for kind in ('dit', 'mmdit', 'mmdit_text')
  for modulation in ('block', 'single')
  for remat in (False, True)
]


@pytest.mark.parametrize('kind, modulation, remat', CASES)
def test_scanned_model_computes_the_same_outputs_loss_and_gradients(kind, modulation, remat):
  model, args, kw = make(kind, modulation, remat)
  scanned = model.clone(scan_layers=True)
  params = host_params(model, args, kw)
  (loss, out), grads = loss_and_grads(model)(params, args, kw)
  (loss_s, out_s), grads_s = loss_and_grads(scanned)(scan.to_layout(scanned, params), args, kw)
  stacked = grads_s['blocks']['qkv' if kind == 'dit' else 'image']
  assert jax.tree.leaves(stacked)[0].shape[0] == model.scanned_depth
  grads_s = scan.unstack_blocks(grads_s)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads)
  np.testing.assert_allclose(out_s, out, rtol=0, atol=1e-5 * np.abs(out).max())
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for (path, g), g_s in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_s), strict=True):
    np.testing.assert_allclose(g_s, g, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def abstract_boxed(model, args, kw):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw)['params'])


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


@pytest.mark.parametrize(
  'kind, modulation', [('dit', 'block'), ('dit', 'single'), ('mmdit', 'block'), ('mmdit_text', 'single')]
)
def test_scanned_params_are_the_stacked_blocks_with_a_layers_axis(kind, modulation):
  """The scanned model's own init has the tree, shapes and logical names of the converted unscanned one (a leading
  `layers` axis on the stacked blocks), and as many parameters."""
  model, args, kw = make(kind, modulation, False)
  scanned = model.clone(scan_layers=True)
  boxed, boxed_s = abstract_boxed(model, args, kw), abstract_boxed(scanned, args, kw)
  assert count(boxed) == count(boxed_s)
  converted = scan.stack_blocks(boxed, model.scanned_depth)
  assert jax.tree.structure(converted, is_leaf=_is_box) == jax.tree.structure(boxed_s, is_leaf=_is_box)
  for a, b in zip(jax.tree.leaves(converted, is_leaf=_is_box), jax.tree.leaves(boxed_s, is_leaf=_is_box), strict=True):
    assert (a.names, a.value.shape, a.value.dtype) == (b.names, b.value.shape, b.value.dtype)
  kernel = boxed_s['blocks']['image' if kind != 'dit' else 'mlp']
  kernel = kernel['qkv']['kernel'] if kind != 'dit' else kernel['fc1']['kernel']
  assert kernel.names[0] == axes.LAYERS and kernel.value.shape[0] == model.scanned_depth
  if kind != 'dit':  # the last, context pre-only block is not scanned
    assert f'blocks_{model.depth - 1}' in boxed_s and 'proj' not in boxed_s[f'blocks_{model.depth - 1}']['context']
  assert scan.unstack_blocks(converted) == boxed


def test_paper_size_counts_are_unchanged_by_scanning():
  """The module docstrings' counts, from the scanned models (cheap: one block is traced)."""
  x, t, y = inputs(1, 32, 32)
  init = lambda m: count(jax.eval_shape(lambda: m.init(jax.random.key(0), x, t, y)))
  assert init(models.MMDiT_paper(num_classes=1000, scan_layers=True)) == 2_359_377_424
  dit = dict(patch_size=2, hidden_size=1536, depth=28, num_heads=24, num_classes=1000, modulation='single')
  assert init(models.DiT(**dit, scan_layers=True)) == 811_880_464


@pytest.mark.parametrize('kind', ['dit', 'mmdit'])
@pytest.mark.parametrize('array', ['numpy', 'jax'])
def test_conversion_round_trips_are_bitwise(kind, array):
  model, args, kw = make(kind, 'block', False)
  params = host_params(model, args, kw)
  if array == 'jax':
    params = jax.tree.map(jnp.asarray, params)
  stacked = scan.stack_blocks(params, model.scanned_depth)
  assert all(isinstance(x, jax.Array if array == 'jax' else np.ndarray) for x in jax.tree.leaves(stacked))
  back = scan.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  again = scan.stack_blocks(back, model.scanned_depth)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  scanned = model.clone(scan_layers=True)
  assert scan.to_layout(scanned, stacked).keys() == stacked.keys()  # already scanned: unchanged
  assert scan.to_layout(model, stacked).keys() == params.keys()
  assert scan.to_layout(model, params).keys() == params.keys()


def test_conversion_errors_name_the_problem():
  model, args, kw = make('mmdit', 'block', False)
  params = host_params(model, args, kw)
  with pytest.raises(ValueError, match='blocks_2 has other parameters than blocks_0'):
    scan.stack_blocks(params, model.depth)  # the pre-only last block does not stack
  with pytest.raises(ValueError, match='params have no blocks_3'):
    scan.stack_blocks(params, 4)
  stacked = scan.stack_blocks(params, model.scanned_depth)
  with pytest.raises(ValueError, match='already hold a stacked'):
    scan.stack_blocks(stacked, 1)
  with pytest.raises(ValueError, match='unscanned layout'):
    scan.unstack_blocks(params)


def test_a_one_block_mmdit_has_one_layout():
  model, args, kw = make('mmdit', 'block', False)
  model = model.clone(depth=1)
  params = host_params(model, args, kw)
  scanned = model.clone(scan_layers=True)
  assert scan.to_layout(scanned, params).keys() == params.keys() == {*params} and 'blocks' not in params
  apply = lambda m: np.asarray(m.apply({'params': params}, *args, **kw))
  np.testing.assert_array_equal(apply(scanned), apply(model))


def test_imported_weights_reach_a_scanned_config(tmp_path):
  """`build.import_denoiser` gives the configured model's layout: a diffusers folder written from unscanned params
  (`save_diffusers`), imported for a scanned DiT, computes what the unscanned params do."""
  from lpl_jax.train import build

  model, args, kw = make('dit', 'block', False)
  params = host_params(model, args, kw)
  models.save_diffusers(tmp_path, model, params, sample_size=8)
  scanned = model.clone(scan_layers=True, remat=True, remat_policy='dots_saveable')
  imported = build.import_denoiser(scanned, str(tmp_path))
  assert scan.is_scanned(imported)
  out = fast_jit(lambda p: scanned.apply({'params': p}, *args))(imported)
  np.testing.assert_allclose(out, fast_jit(lambda p: model.apply({'params': p}, *args))(params), rtol=0, atol=1e-5)
