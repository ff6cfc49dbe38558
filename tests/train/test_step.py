"""The train step on one device: LPL gradients, the start-step switch, chunking, no host transfers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import train
from tests.train import common

# Each test compiles a whole train step with the decoder's forward and backward (~40 s apiece on 2 cores): left to CI.
pytestmark = pytest.mark.slow


def _run(steps=2, **kw):
  model, ae_model, ae_params, cfg = common.setup(**kw)
  optimizer = train.make_optimizer(cfg.optim)
  mesh = train.make_mesh(devices=jax.devices()[:1])
  state, shardings = train.init_state(common.init_params_fn(model), optimizer, jax.random.key(0), mesh, fsdp=False)
  traces = []

  def counted(*args):
    traces.append(1)
    return train.train_step(*args, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model, mesh=mesh)

  batch = jax.device_put(common.batch())
  step = jax.jit(counted, donate_argnums=(0,))
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch, ae_params)
    history.append(dict(jax.device_get(metrics), params=_flat(jax.device_get(state.params))))
  return jax.device_get(state), history, len(traces), (step, state, batch, ae_params)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope='module')
def with_lpl():
  return _run(weight=3.0, steps=1)


@pytest.fixture(scope='module')
def zero_weight():
  return _run(weight=0.0, steps=1)


@pytest.fixture(scope='module')
def switched_on_at_1():
  return _run(steps=3, start_step=1)


def test_lpl_gradient_reaches_the_denoiser(with_lpl, zero_weight):
  state, history, _, _ = with_lpl
  rows = common.setup()[3].lpl_rows_per_group  # one group on one device: K rows in all
  assert history[0]['loss/lpl'] > 0 and history[0]['lpl/rows'] == rows > 0
  assert history[0]['loss/total'] == pytest.approx(
    history[0]['loss/diffusion'] + 3.0 * history[0]['loss/lpl'] * rows / common.BATCH, rel=1e-5
  )
  assert np.max(np.abs(_flat(state.params) - _flat(zero_weight[0].params))) > 1e-4


def test_zero_weight_equals_lpl_off(zero_weight, switched_on_at_1):
  """Step 0 of a run whose LPL starts at step 1 (inactive: the LPL branch is skipped) updates exactly as a run with
  w_lpl = 0."""
  zero, h_zero, _, _ = zero_weight
  _, h_off, _, _ = switched_on_at_1
  assert h_off[0]['lpl/active'] == 0 and h_off[0]['loss/lpl'] == 0
  assert h_zero[0]['loss/total'] == pytest.approx(h_off[0]['loss/total'], rel=1e-6)
  assert h_zero[0]['grad_norm'] == pytest.approx(h_off[0]['grad_norm'], rel=1e-6)
  np.testing.assert_allclose(_flat(zero.params), h_off[0]['params'], rtol=1e-6, atol=1e-7)


def test_switching_on_at_start_step_does_not_recompile(switched_on_at_1):
  _, history, traces, _ = switched_on_at_1
  assert [int(h['lpl/active']) for h in history] == [0, 1, 1]
  assert history[0]['loss/lpl'] == 0 and history[1]['loss/lpl'] > 0
  assert traces == 1


def test_chunked_lpl_equals_unchunked(with_lpl):
  chunked, history, _, _ = _run(weight=3.0, chunk=common.setup()[3].lpl_rows_per_group // 2, steps=1)
  state, ref_history, _, _ = with_lpl
  assert history[0]['loss/lpl'] == pytest.approx(ref_history[0]['loss/lpl'], rel=1e-5)
  np.testing.assert_allclose(_flat(chunked.params), _flat(state.params), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_one_pass():
  """Two micro-batches of 8 rows, gradients summed, one update == one pass over the 16 rows (same draws: two LPL
  groups of 8 rows in both runs)."""
  one, h_one, _, _ = _run(weight=3.0, groups=2, steps=2)
  two, h_two, _, _ = _run(weight=3.0, groups=2, accum=2, steps=2)
  for key in ('loss/total', 'loss/diffusion', 'loss/lpl', 'grad_norm', 'lpl/rows', 'lpl/layer_0'):
    assert h_two[1][key] == pytest.approx(h_one[1][key], rel=1e-5), key
  assert h_one[0]['loss/lpl'] > 0
  np.testing.assert_allclose(_flat(two.params), _flat(one.params), rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_float32_master_weights_and_loss(with_lpl):
  """bf16 activations in the denoiser and the decoder: params, optimizer state, EMA and losses stay float32, and the
  losses and gradient norm stay close to the float32 step."""
  state, history, _, _ = _run(weight=3.0, steps=1, dtype=jnp.bfloat16)
  _, ref, _, _ = with_lpl
  for tree in (state.params, state.ema_params, state.opt_state):
    assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {np.dtype(np.float32)}
  for key in ('loss/total', 'loss/diffusion', 'loss/lpl', 'grad_norm'):
    assert history[0][key].dtype == np.float32
    assert history[0][key] == pytest.approx(ref[0][key], rel=3e-2), key


def test_denoiser_remat_gives_the_same_step(with_lpl):
  state, history, _, _ = _run(weight=3.0, steps=1, remat=True)
  ref_state, ref, _, _ = with_lpl
  assert history[0]['loss/total'] == pytest.approx(ref[0]['loss/total'], rel=1e-6)
  np.testing.assert_allclose(_flat(state.params), _flat(ref_state.params), rtol=1e-5, atol=1e-6)


def test_steady_state_steps_do_no_host_transfer(switched_on_at_1):
  _, _, _, (step, state, batch, ae_params) = switched_on_at_1
  with jax.transfer_guard('disallow'):
    for _ in range(2):
      state, metrics = step(state, batch, ae_params)
  jax.block_until_ready(metrics)


def test_bad_step_config():
  with pytest.raises(ValueError, match="lpl_normalize='gated'"):
    train.StepConfig(None, None, train.OptimConfig(), lpl_normalize='gated')
  with pytest.raises(ValueError, match='accum_steps=0'):
    train.StepConfig(None, None, train.OptimConfig(), accum_steps=0)
  with pytest.raises(ValueError, match='invalid optimizer config'):
    train.OptimConfig(lr=-1.0)
