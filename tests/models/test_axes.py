"""Logical axis names on every parameter, and the suggested FSDP rules."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from lpl_jax import models
from lpl_jax.models import axes
from tests.models.common import fast_jit, inputs

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def abstract_params(model, x, t, **cond):
  """Boxed (`nn.LogicallyPartitioned`) parameter shapes, nothing allocated."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **cond))['params']


def boxed_leaves(params):
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))[0]
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


NAMES = ['dit', 'mmdit_class', 'mmdit_text', 'dit_single', 'mmdit_single']


def configurations(tiny: bool):
  x, t, y = inputs(1, 8 if tiny else 32, 8 if tiny else 32)
  ctx, pooled = jnp.zeros((1, 5, 12 if tiny else 4096)), jnp.zeros((1, 10 if tiny else 2048))
  text = dict(context_dim=ctx.shape[-1], pooled_dim=pooled.shape[-1], qk_norm=True)
  if tiny:
    dit, mm = functools.partial(models.DiT, **TINY), functools.partial(models.MMDiT, **TINY)
  else:  # DiT-XL/2; with adaLN-single, DiT at the LPL paper's size (28 x 1536)
    dit, mm = models.DiT_XL_2, models.MMDiT_paper
  dit_single = functools.partial(models.DiT, **(TINY if tiny else dict(hidden_size=1536, num_heads=24)))
  return {
    'dit': (dit(), x, t, dict(y=y)),
    'mmdit_class': (mm(num_class_tokens=2), x, t, dict(y=y)),
    'mmdit_text': (mm(**text), x, t, dict(context=ctx, pooled=pooled)),
    'dit_single': (dit_single(modulation='single'), x, t, dict(y=y)),
    'mmdit_single': (mm(**text, modulation='single'), x, t, dict(context=ctx, pooled=pooled)),
  }


@pytest.mark.parametrize('name', NAMES)
def test_every_parameter_has_logical_axes(name):
  model, x, t, cond = configurations(tiny=True)[name]
  leaves = boxed_leaves(abstract_params(model, x, t, **cond))
  unboxed = [path for path, leaf in leaves if not isinstance(leaf, nn.LogicallyPartitioned)]
  assert not unboxed, f'parameters without logical axis names: {unboxed}'
  for path, leaf in leaves:
    names = leaf.names
    assert len(names) == leaf.value.ndim, (path, names, leaf.value.shape)
    assert set(names) <= set(axes.PARAM_AXES) | {None}, (path, names)
    if leaf.value.ndim >= 2:
      assert any(n is not None for n in names), (path, names)
  specs = nn.get_partition_spec(abstract_params(model, x, t, **cond))
  assert all(len(s) >= 1 for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))


@pytest.mark.parametrize('name', NAMES)
def test_fsdp_rules_shard_every_matrix_of_the_full_size_models(name):
  """DiT-XL/2, the paper's MMDiT and both with adaLN-single at 28 x 1536: each kernel and embedding table gets
  exactly one dimension on `fsdp`, and every sharded dimension (biases and adaLN-single's tables included) divides
  over 16 devices."""
  model, x, t, cond = configurations(tiny=False)[name]
  rules = axes.fsdp_rules()
  for path, leaf in boxed_leaves(abstract_params(model, x, t, **cond)):
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
    sharded = [dim for dim, a in zip(leaf.value.shape, mesh_axes) if a == 'fsdp']
    if path.endswith(("['kernel']", "['embedding']")):
      assert len(sharded) == 1, (path, leaf.names)
    assert all(dim % 16 == 0 for dim in sharded), (path, leaf.value.shape, leaf.names)


def test_adaln_single_tables_are_named_like_the_width():
  """adaLN-single's per-block tables `[n, D]` name their width `EMBED` (sharded with the residual stream's width);
  the shared Linear is named as every modulation Linear, `[EMBED, ADALN]`."""
  model, x, t, cond = configurations(tiny=True)['mmdit_single']
  leaves = dict(boxed_leaves(abstract_params(model, x, t, **cond)))
  tables = {path: leaf for path, leaf in leaves.items() if path.endswith("['scale_shift_table']")}
  assert len(tables) == 2 * TINY['depth'] + 1
  assert all(leaf.names == (None, axes.EMBED) for leaf in tables.values())
  assert leaves["['adaLN_single']['linear']['kernel']"].names == (axes.EMBED, axes.ADALN)


def test_params_initialise_directly_in_their_sharded_layout():
  """The intended use, as in MaxText: under a mesh and the rules, shapes from eval_shape, shardings from the logical
  names, init jitted with those out_shardings; the token streams then carry sharding constraints. Same values as
  without any of it."""
  model, x, t, cond = configurations(tiny=True)['mmdit_text']
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  init = lambda k: model.init(k, x, t, **cond)
  apply = lambda p: model.apply(p, x, t, **cond)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axes.fsdp_rules()):
    shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0))), mesh, axes.fsdp_rules()
    )
    params = fast_jit(init, out_shardings=shardings)(jax.random.key(0))
    assert 'sharding_constraint' in str(jax.make_jaxpr(apply)(params))
    constrained = fast_jit(apply)(params)
  kernel = params['params']['blocks_0']['image']['qkv']['kernel']
  assert kernel.names == (axes.EMBED, None, axes.HEADS, axes.KV)
  assert kernel.value.sharding.spec == jax.sharding.PartitionSpec('fsdp', None, None, None)
  assert isinstance(kernel.value.sharding, NamedSharding)
  np.testing.assert_array_equal(constrained, fast_jit(apply)(params))
