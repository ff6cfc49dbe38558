"""The README's "LPL in your own JAX trainer" snippet runs as printed and trains."""

import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_snippet_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  section = text.split('## LPL in your own JAX trainer', 1)[1]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # the snippet is the thing under test
  first = float(scope['loss'])
  jax = scope['jax']
  params, opt_state = scope['params'], scope['opt_state']
  start = jax.tree.leaves(params)
  for i in range(3):
    params, opt_state, loss = scope['train_step'](params, opt_state, jax.random.key(10 + i))
  assert np.isfinite(first) and np.isfinite(float(loss))
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), start, strict=True)) > 0
