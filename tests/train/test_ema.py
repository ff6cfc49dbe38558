"""The EMA of the params: the decay with its warmup, and a delayed start (the EMA follows the params exactly until
`ema_start_step`, then averages with the warmup counted from there), against a NumPy transcription."""

import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax.train.state import OptimConfig, ema_update


def _numpy_ema(params_by_step, decay, warmup, start):
  ema = params_by_step[0]
  for step, p in enumerate(params_by_step[1:], start=1):
    n = step - start
    d = min(decay, (1 + n) / (10 + n)) if warmup else decay
    d = d if n > 0 else 0.0
    ema = d * ema + (1 - d) * p
  return ema


@pytest.mark.parametrize('warmup', [False, True])
@pytest.mark.parametrize('start', [0, 3])
def test_ema_with_warmup_and_delayed_start(warmup, start):
  cfg = OptimConfig(ema_decay=0.9, ema_warmup=warmup, ema_start_step=start)
  params = [np.random.default_rng(s).normal(size=(5,)).astype(np.float32) for s in range(8)]
  ema = {'w': jnp.asarray(params[0])}
  for step in range(1, 8):
    ema = ema_update(ema, {'w': jnp.asarray(params[step])}, jnp.asarray(step, jnp.int32), cfg)
    if step <= start:
      np.testing.assert_array_equal(np.asarray(ema['w']), params[step])  # the params themselves until the start
  np.testing.assert_allclose(np.asarray(ema['w']), _numpy_ema(params, 0.9, warmup, start), rtol=1e-6)


def test_ema_start_step_is_checked():
  with pytest.raises(ValueError, match='ema_start_step=-1'):
    OptimConfig(ema_start_step=-1)
