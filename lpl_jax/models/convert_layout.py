"""Denoiser parameters <-> PyTorch state dicts, by rules: one rule per layer says which of our parameters
(a subtree such as `('blocks_0', 'qkv')`) holds which tensors of the file, and how their layouts differ.

A model's rules (`convert_dit`, `convert_sd3`) serve both directions: `to_state_dict` writes the file's tensors from
our parameters (export), `from_state_dict` reads them back (import), and `state_shapes` traces the export with
`jax.eval_shape` to get the file's names and shapes for a model without computing anything, which is what an import
checks a file against (`check_tensors`: one `WeightsMismatchError` naming every missing, unexpected, mis-shaped or
doubly given tensor). The kinds of layer, with the file's layout first and ours second:

  linear       `m.weight [O, I]`, `m.bias [O]`  <->  `kernel [I, O]`, `bias [O]`
  linear_swap  the same, the two halves of O swapped: diffusers' `AdaLayerNormContinuous` chunks its output as
               (scale, shift), DiT's adaLN and ours as (shift, scale)
  patch        conv `m.weight [D, C, p, p]`, `m.bias`  <->  Linear on flattened patches `kernel [p*p*C, D]`
               (rows in (row, column, channel) order, `layers.patchify`'s)
  qkv          three Linears `q`, `k`, `v` `[D, D]`  <->  `kernel [D, 3, heads, head_dim]`, `bias [3, heads, head_dim]`
  qkv_fused    timm's one Linear `m.weight [3D, D]` (q, k, v stacked, heads contiguous in each)  <->  the same
  out          attention output Linear `m.weight [D, D]`  <->  `kernel [heads, head_dim, D]`
  embedding    `m.weight [N, D]`  <->  `embedding [N, D]`
  scale        `m.weight [n]` (RMSNorm)  <->  `scale [n]`

A rule may name `copies`: other modules of the file that hold the same tensors (diffusers' DiT gives every block
its own copy of the timestep and label embedders); export writes each, import requires them equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lpl_jax import weights
from lpl_jax.weights import Path, WeightsMismatchError

KINDS = ('linear', 'linear_swap', 'patch', 'qkv', 'qkv_fused', 'out', 'embedding', 'scale')


class Rule(NamedTuple):
  """Our parameter subtree `ours` <-> the file's modules `theirs` (three for `qkv`, one otherwise).

  `size` is the patch size of a `patch` rule and the number of heads of `qkv`, `qkv_fused` and `out` rules (which
  the file's flat shapes do not hold)."""

  ours: Path
  kind: str
  theirs: tuple[str, ...]
  size: int = 0
  copies: tuple[str, ...] = ()


def _swap_halves(a, xp, axis: int):
  return xp.concatenate(xp.split(a, 2, axis=axis)[::-1], axis=axis)


def _export(rule: Rule, p: Mapping[str, Any], xp) -> dict[str, Any]:
  """Our subtree `p` -> `{file name: tensor}` for one rule, with `xp` NumPy or jax.numpy (for `jax.eval_shape`)."""
  kind, names = rule.kind, rule.theirs
  if kind in ('linear', 'linear_swap'):
    w, b = p['kernel'].T, p['bias']
    if kind == 'linear_swap':
      w, b = _swap_halves(w, xp, 0), _swap_halves(b, xp, 0)
    return {f'{names[0]}.weight': w, f'{names[0]}.bias': b}
  if kind == 'patch':
    n, d = p['kernel'].shape
    ps = rule.size
    w = p['kernel'].reshape(ps, ps, n // (ps * ps), d).transpose(3, 2, 0, 1)
    return {f'{names[0]}.weight': w, f'{names[0]}.bias': p['bias']}
  if kind in ('qkv', 'qkv_fused'):
    d = p['kernel'].shape[0]
    w, b = p['kernel'].reshape(d, 3, -1), p['bias'].reshape(3, -1)
    if kind == 'qkv_fused':
      return {f'{names[0]}.weight': w.reshape(d, -1).T, f'{names[0]}.bias': b.reshape(-1)}
    out = {}
    for i, name in enumerate(names):
      out |= {f'{name}.weight': w[:, i].T, f'{name}.bias': b[i]}
    return out
  if kind == 'out':
    h, hd, d = p['kernel'].shape
    return {f'{names[0]}.weight': p['kernel'].reshape(h * hd, d).T, f'{names[0]}.bias': p['bias']}
  if kind == 'embedding':
    return {f'{names[0]}.weight': p['embedding']}
  if kind == 'scale':
    return {f'{names[0]}.weight': p['scale']}
  raise ValueError(f'unknown rule kind {kind!r}; expected one of {KINDS}.')


def _import(rule: Rule, get) -> dict[str, np.ndarray]:
  """`get(file name) -> tensor` -> our subtree for one rule (the inverse of `_export`)."""
  kind, names = rule.kind, rule.theirs
  if kind in ('linear', 'linear_swap'):
    w, b = get(f'{names[0]}.weight').T, get(f'{names[0]}.bias')
    if kind == 'linear_swap':
      w, b = _swap_halves(w, np, 1), _swap_halves(b, np, 0)
    return {'kernel': w, 'bias': b}
  if kind == 'patch':
    w = get(f'{names[0]}.weight')
    return {'kernel': w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), 'bias': get(f'{names[0]}.bias')}
  if kind in ('qkv', 'qkv_fused'):
    if kind == 'qkv_fused':
      w, b = get(f'{names[0]}.weight').T, get(f'{names[0]}.bias')  # [D, 3D], [3D]
    else:
      w = np.concatenate([get(f'{n}.weight').T for n in names], axis=1)
      b = np.concatenate([get(f'{n}.bias') for n in names])
    d, heads = w.shape[0], rule.size
    return {'kernel': w.reshape(d, 3, heads, -1), 'bias': b.reshape(3, heads, -1)}
  if kind == 'out':
    w = get(f'{names[0]}.weight').T
    return {'kernel': w.reshape(rule.size, -1, w.shape[1]), 'bias': get(f'{names[0]}.bias')}
  if kind == 'embedding':
    return {'embedding': get(f'{names[0]}.weight')}
  if kind == 'scale':
    return {'scale': get(f'{names[0]}.weight')}
  raise ValueError(f'unknown rule kind {kind!r}; expected one of {KINDS}.')


def _subtree(params: Mapping[str, Any], path: Path) -> Any:
  for part in path:
    params = params[part]
  return params


def _renamed(tensors: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
  return {new + name[len(old) :]: v for name, v in tensors.items()}


def to_state_dict(rules: Sequence[Rule], params: Mapping[str, Any], xp=np) -> dict[str, Any]:
  """Our (unboxed) parameters -> the file's `{name: tensor}` in PyTorch layouts, copies included."""
  out = {}
  for rule in rules:
    tensors = _export(rule, _subtree(params, rule.ours), xp)
    out |= tensors
    for copy in rule.copies:
      out |= _renamed(tensors, rule.theirs[0], copy)
  return out


def state_shapes(rules: Sequence[Rule], param_shapes: Mapping[Path, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """`{file name: PyTorch shape}` of the export of parameters with `param_shapes` (`weights.expected_shapes`),
  traced: nothing is computed or allocated."""
  tree = flax.traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes.items()})
  traced = jax.eval_shape(lambda p: to_state_dict(rules, p, jnp), tree)
  return {name: tuple(a.shape) for name, a in traced.items()}


def check_tensors(
  tensors: Iterable[tuple[str, np.ndarray] | tuple[str, np.ndarray, str]],
  expected: Mapping[str, tuple[int, ...]],
  *,
  target: str,
) -> dict[str, np.ndarray]:
  """The file's tensors, `(name, value)` or `(name, value, label)` (how errors name it: with its shard, say),
  checked by name and shape against `expected` (`state_shapes`, plus buffers).

  Raises:
    WeightsMismatchError: `weights do not match {target}:` and every missing, unexpected, mis-shaped,
      non-floating-point or doubly given (e.g. in two shards) tensor, by its name in the file.
  """
  matched = weights.match_params(
    ((entry[-1] if len(entry) == 3 else entry[0], (entry[0],), entry[1]) for entry in tensors),
    {(name,): shape for name, shape in expected.items()},
    target=target,
    name_of=lambda path: path[0],
    file_shape=tuple,
  )
  return {path[0]: value for path, value in matched.items()}


def from_state_dict(rules: Sequence[Rule], state: Mapping[str, np.ndarray], *, source: str, why_copies: str) -> dict:
  """The file's tensors (`check_tensors`) -> our nested parameters (NumPy, the file's dtypes).

  Raises:
    WeightsMismatchError: a rule's copies differ from its first module (`why_copies` says why they must not),
      naming every differing tensor.
  """
  flat, differing = {}, []
  for rule in rules:
    sub = _import(rule, state.__getitem__)
    flat |= {rule.ours + (leaf,): value for leaf, value in sub.items()}
    first = _export(rule, sub, np)
    for copy in rule.copies:
      for name, value in _renamed(first, rule.theirs[0], copy).items():
        if not np.array_equal(np.asarray(state[name], np.float32), np.asarray(value, np.float32)):
          differing.append(f'{name} (differs from {rule.theirs[0]}{name[len(copy) :]})')
  if differing:
    raise WeightsMismatchError(
      f'{source}: {len(differing)} tensor(s) that must be copies of one another differ; {why_copies}:\n    '
      + '\n    '.join(differing)
    )
  return flax.traverse_util.unflatten_dict(flat)


def check_buffer(state: Mapping[str, np.ndarray], name: str, expected: np.ndarray, *, source: str, what: str) -> None:
  """A fixed (not learned) tensor of the file, `name`, must equal the one the model computes, `expected`: within
  1e-5 (sin-cos tables computed in float32 or float64), or the rounding of the file's dtype if coarser (a float16
  file's table is rounded to 2^-11).

  Raises:
    WeightsMismatchError: naming the tensor, the largest difference and what the model computes (`what`).
  """
  stored = np.asarray(state[name])
  tolerance = max(1e-5, float(ml_dtypes.finfo(stored.dtype).eps))
  err = float(np.max(np.abs(stored.astype(np.float64) - np.asarray(expected, np.float64)), initial=0.0))
  if not err <= tolerance:
    raise WeightsMismatchError(
      f'{source}: tensor {name} is not the positional embedding the model computes ({what}): largest difference '
      f'{err:.3g} (tolerance {tolerance:.3g}). The model has no parameter for it, so these weights would run with '
      'other positions than they were trained with.'
    )


def param_mismatch(params: Mapping[str, Any], expected: Mapping[Path, tuple[int, ...]]) -> list[str]:
  """`'path: shape'` of every parameter that `params` has and `expected` has not, or with another shape, and of every
  expected one it lacks (empty when the tree is the model's)."""
  got = {p: tuple(np.shape(v)) for p, v in flax.traverse_util.flatten_dict(dict(params)).items()}
  diff = set(got.items()) ^ {(p, tuple(s)) for p, s in expected.items()}
  return [f'{"/".join(p)}: {s}' + (' (given)' if got.get(p) == s else ' (expected)') for p, s in sorted(diff)]


def check_converted(params: Mapping[str, Any], expected: Mapping[Path, tuple[int, ...]]) -> None:
  """Internal consistency of an import: the rules cover exactly the model's parameters (else a bug here)."""
  mismatch = param_mismatch(params, expected)
  if mismatch:
    raise AssertionError(f'the conversion rules do not produce the model parameters: {mismatch[:10]}')


def cast(params: Mapping[str, Any], param_dtype: Any) -> dict:
  """Every leaf as a `param_dtype` jax array."""
  return jax.tree.map(lambda v: jnp.asarray(v, dtype=param_dtype), dict(params))
