"""Named remat policies (`model.remat_policy`, `lpl.remat_policy`; `lpl_jax.models.layers.remat_policy`): each is the
`jax.checkpoint` policy it names, keeps what it says for the backward pass, and changes no value or gradient, in the
denoisers (scanned or not) and in the LPL decoder branch; the config fields reach the modules."""

import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import autoencoder as ae
from lpl_jax import lpl, models
from lpl_jax.models import layers as L
from lpl_jax.models import scan
from tests.models.common import fast_jit, inputs, perturb

TINY = dict(patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=10)


def test_each_name_is_its_jax_policy():
  policies = jax.checkpoint_policies
  assert L.remat_policy('full') is policies.nothing_saveable
  assert L.remat_policy('dots_saveable') is policies.dots_saveable
  assert L.remat_policy('dots_with_no_batch_dims_saveable') is policies.dots_with_no_batch_dims_saveable
  assert L.remat_policy('attention_out') is L.remat_policy('attention_out')  # cached: modules holding it compare equal
  assert set(L.REMAT_POLICIES) == {'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'attention_out'}
  with pytest.raises(ValueError, match=r"remat_policy='dots'; expected one of"):
    L.remat_policy('dots')


def _residuals(module, *args) -> list[str]:
  """What `module` saves for its backward pass (`jax.ad_checkpoint.print_saved_residuals`, a line per array),
  besides its inputs, params and constants (params are zeros: only shapes matter)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args)['params'])
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(
      lambda p, x: module.apply({'params': p}, x, *args[1:]).sum(), params, args[0]
    )
  lines = out.getvalue().splitlines()
  return [line for line in lines if 'from the argument' not in line and 'from a constant' not in line]


def _block_residuals(policy: str | None) -> list[str]:
  """What one (rematerialised) DiT block saves."""
  block_cls = models.DiTBlock if policy is None else nn.remat(models.DiTBlock, policy=L.remat_policy(policy))
  return _residuals(block_cls(32, 4), jnp.ones((2, 16, 32)), jnp.ones((2, 32)))


def test_policies_keep_what_they_name():
  """`'full'` keeps nothing computed in the block; `'attention_out'` exactly the attention output; the dot policies
  the matrix products (`'dots_saveable'` also the attention's batched ones); no remat keeps the most."""
  full, attn = _block_residuals('full'), _block_residuals('attention_out')
  dots, no_batch = _block_residuals('dots_saveable'), _block_residuals('dots_with_no_batch_dims_saveable')
  assert full == []
  assert len(attn) == 1 and f"named '{L.ATTENTION_OUT}'" in attn[0]
  assert all('output of dot_general' in line for line in dots + no_batch)
  # the modulation Linear, qkv, output projection, fc1, fc2; with batch dimensions also the logits and the output
  assert len(no_batch) == 5 and len(dots) == 7
  assert len(_block_residuals(None)) > len(dots)


def _grads(model, params, args):
  loss = lambda p: jnp.mean((model.apply({'params': p}, *args) - 0.5) ** 2)
  return fast_jit(jax.grad(loss))(params)


@pytest.mark.parametrize('kind', ['dit', 'mmdit'])
def test_policies_change_no_gradient(kind):
  """Every policy of a scanned model (one compile each) gives the gradients of the model without remat."""
  cls = models.DiT if kind == 'dit' else models.MMDiT
  tiny = dict(TINY, depth=3 if kind == 'dit' else 2)
  model = cls(**tiny, scan_layers=True, modulation='single' if kind == 'dit' else 'block')
  args = inputs(2, 8, 8)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args)['params']))
  params = perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), 5)
  want = _grads(model, params, args)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
  policies = ('full', 'attention_out', 'dots_with_no_batch_dims_saveable') if kind == 'dit' else ('attention_out',)
  for policy in policies:
    got = _grads(model.clone(remat=True, remat_policy=policy), params, args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale, err_msg=policy)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_models_apply_the_policy_to_every_block(scan_layers):
  """The attention outputs `[2, 16, 4, 8]` are kept: one named array per block, or the scan's stacked output."""
  model = models.DiT(**TINY, remat=True, remat_policy='attention_out', scan_layers=scan_layers)
  if scan_layers:
    kept = lambda m: [
      line for line in _residuals(m, *inputs(2, 8, 8)) if line.startswith('f32[3,2,16,4,8] output of scan')
    ]
  else:
    kept = lambda m: [line for line in _residuals(m, *inputs(2, 8, 8)) if f"named '{L.ATTENTION_OUT}'" in line]
  assert len(kept(model)) == (1 if scan_layers else model.depth)
  assert kept(model.clone(remat_policy='full')) == []


def test_lpl_decoder_branch_policy():
  """`LPLConfig.remat_policy` is checked, reaches the decoder's rematerialised blocks, and changes no gradient."""
  with pytest.raises(ValueError, match=r"LPLConfig.remat_policy='some'"):
    lpl.LPLConfig(remat_policy='some')
  model = ae.from_preset('tiny')
  shapes = jax.eval_shape(lambda: ae.init_params(model, jax.random.key(0)))
  params = perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), 2)
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 4, 4, model.config.latent_channels)).astype(np.float32)
  z0 = 0.5 * z

  def bound(**kw):
    cfg = lpl.LPLConfig.from_preset('paper', num_blocks=2, **kw)
    return cfg, lpl.make_features_fn(model, params, cfg)

  def grad(**kw):
    cfg, features_fn = bound(**kw)
    return fast_jit(jax.grad(lambda zh: lpl.lpl_loss(features_fn, zh, z0, cfg)[0].sum()))(z)

  assert bound(remat=False)[1].model.remat_policy is None
  for policy in L.REMAT_POLICIES:
    decoder = bound(remat_policy=policy)[1].model
    assert decoder.remat and decoder.remat_policy is L.remat_policy(policy)
  want = grad(remat=False)
  np.testing.assert_allclose(grad(remat_policy='dots_saveable'), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_config_fields_reach_the_modules():
  from lpl_jax.train import build, config
  from tests.run import common

  overrides = {'model.remat_policy': 'attention_out', 'model.scan_layers': True, 'lpl.remat_policy': 'dots_saveable'}
  exp = common.experiment('demo_cpu.py', 'post,lpl', **overrides)
  model = build.make_denoiser(exp, latent_channels=4)
  assert (model.remat_policy, model.scan_layers) == ('attention_out', True)
  assert config.lpl_config(exp.lpl).remat_policy == 'dots_saveable'
  assert scan.scanned_depth(model) == model.depth
