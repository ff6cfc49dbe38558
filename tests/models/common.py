"""Test helpers shared by the denoiser tests: NumPy inputs and parameter perturbation (nothing per-shape is
compiled), parameter counts."""

import functools

import jax
import numpy as np


def perturb(params, seed: int, scale: float = 0.1):
  """Every parameter moved off its initial value (zero adaLN and output layers would make every output 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32), params)


def inputs(b: int = 2, h: int = 8, w: int = 8, c: int = 4, seed: int = 0, num_classes: int = 10):
  """`(x [B, H, W, C], t [B] in [0, 1000), y [B] in 0..num_classes)`, the null class included."""
  rng = np.random.default_rng(seed)
  return (
    rng.standard_normal((b, h, w, c)).astype(np.float32),
    rng.uniform(0, 1000, b).astype(np.float32),
    rng.integers(0, num_classes + 1, b).astype(np.int32),
  )


def count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# XLA:CPU's backend optimisations (LLVM) take most of the compile time of these tiny models and buy nothing for
# tests that run each program a few times: off, compiling is about 3x faster (a 2-block MMDiT gradient: 7 s -> 2.5 s).
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def fast_jit(fun, **jit_kwargs):
  """`jax.jit(fun, **jit_kwargs)`, compiled with `_COMPILER_OPTIONS`, once per input structure, shapes and dtypes
  (the trace-time context, such as a mesh or axis rules, is not part of the key)."""
  jitted, compiled = jax.jit(fun, **jit_kwargs), {}

  def call(*args, **kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    key = (tree, tuple(jax.typeof(a) for a in leaves))
    if key not in compiled:
      compiled[key] = jitted.lower(*args, **kwargs).compile(compiler_options=_COMPILER_OPTIONS)
    return compiled[key](*args, **kwargs)

  return call


@functools.cache
def jitted_apply(model):
  """`f(params, x, t, *args, **kwargs) = model.apply({'params': params}, x, t, ...)` under jit, one per model
  configuration (modules are hashable), so that tests share compilations."""
  return fast_jit(lambda params, x, t, *args, **kwargs: model.apply({'params': params}, x, t, *args, **kwargs))
