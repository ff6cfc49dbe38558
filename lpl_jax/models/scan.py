"""Scan over layers: a denoiser's identical blocks as one `nn.scan`, and its params in either layout.

With `scan_layers=True` (`DiT`, `MMDiT`) the blocks are one `nn.scan` over parameters stacked on a leading axis, so
the step traces and compiles one block instead of `depth` (compile time no longer grows with the depth); with
`remat=True` each scanned block is rematerialised (`nn.remat` inside the scan) with the model's `remat_policy`.

The two layouts of a model's params:

  unscanned (scan_layers=False)      scanned (scan_layers=True)
  blocks_0: {...}                    blocks: {...}            every leaf [n, *shape]: blocks_0 .. blocks_{n-1}
  ...                                                         (logical axis `axes.LAYERS` first)
  blocks_{depth-1}: {...}            blocks_{depth-1}: {...}  MMDiT only: its last block (context pre-only, other
                                                              weights) is not scanned

where `n = scanned_depth(model)` (`depth` for DiT, `depth - 1` for MMDiT); everything else is the same. The importers
and exporters (`from_diffusers`, `save_diffusers`, `dit_from_pytorch_checkpoint`) read and write the unscanned
layout; convert with

  stack_blocks(params, n)        unscanned -> scanned: `blocks_0 .. blocks_{n-1}` stacked into `blocks`
  unstack_blocks(params)         scanned -> unscanned: `blocks` split back into `blocks_0 ..`
  to_layout(model, params)       either layout -> the one `model.scan_layers` asks for (idempotent)

Both are exact (stacking and indexing, bitwise), keep the leaves' array kind (NumPy or jax), and accept boxed params
(`nn.LogicallyPartitioned`: the logical names get or lose `axes.LAYERS` in front). A checkpoint of a run holds the
layout of its config: a run restored or post-trained with the other `model.scan_layers` converts its params with
these (the trainer converts imported pretrained weights itself, `lpl_jax.train.build.import_denoiser`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax.models import axes
from lpl_jax.models import layers as L

BLOCKS = 'blocks'  # the scanned blocks' subtree


def block_class(cls: type[nn.Module], *, remat: bool, policy: str, scanned: bool) -> type[nn.Module]:
  """`cls`, rematerialised with the named policy (`layers.remat_policy`) when `remat`. Inside a scan, common
  subexpression elimination cannot move the recomputation across the loop boundary, so `prevent_cse` is off there
  (as the JAX docs advise for `jax.checkpoint` in `lax.scan`)."""
  if not remat:
    return cls
  return nn.remat(cls, policy=L.remat_policy(policy), prevent_cse=not scanned)


def scan_blocks(step: Callable[..., Any], block: nn.Module, carry: Any, *broadcast: Any, length: int) -> Any:
  """`carry` through `length` applications of `block` with stacked params: `carry = step(block, carry, *broadcast)`
  each time, `broadcast` the same for all.

  Args:
    step: `(block, carry, *broadcast) -> carry`, the body of the loop (calls the block, constrains its outputs).
    block: the block module, created unbound by the caller's compact method with `name=BLOCKS` (its params live
      there, each with a leading axis of `length`, logical name `axes.LAYERS`).
    carry: the residual stream(s), a pytree of arrays.
    broadcast: what every block reads unchanged (the conditioning).
    length: the number of blocks.
  """
  scanned = nn.scan(
    lambda module, c, *b: (step(module, c, *b), None),
    variable_axes={'params': 0},
    split_rngs={'params': True},
    in_axes=(nn.broadcast,) * len(broadcast),
    length=length,
    metadata_params={nn.PARTITION_NAME: axes.LAYERS},
  )
  return scanned(block, carry, *broadcast)[0]


def scanned_depth(model: Any) -> int:
  """How many of `model`'s blocks the scanned layout stacks: `depth` for `DiT`, `depth - 1` for `MMDiT` (its last
  block is context pre-only)."""
  return model.scanned_depth


def _stack(leaves: list[Any]) -> Any:
  first = leaves[0]
  if isinstance(first, nn.LogicallyPartitioned):
    return first.replace(value=_stack([x.value for x in leaves]), names=(axes.LAYERS, *first.names))
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
  xp = jnp if isinstance(first, jax.Array) else np
  return xp.stack(leaves)


def _unstack(leaf: Any, i: int) -> Any:
  if isinstance(leaf, nn.LogicallyPartitioned):
    if not leaf.names or leaf.names[0] != axes.LAYERS:
      raise ValueError(f'a stacked parameter names its leading axis {axes.LAYERS!r}, got {leaf.names}.')
    return leaf.replace(value=_unstack(leaf.value, i), names=tuple(leaf.names[1:]))
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def _is_leaf(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def stack_blocks(params: Mapping[str, Any], num_blocks: int) -> dict[str, Any]:
  """Unscanned -> scanned layout: `blocks_0 .. blocks_{num_blocks-1}` stacked on a new leading axis into `blocks`;
  other entries (a last MMDiT block `blocks_{num_blocks}` included) kept as they are.

  Raises:
    ValueError: `params` already hold `blocks`, miss one of the blocks, or the blocks differ in structure or shape.
  """
  if BLOCKS in params:
    raise ValueError(f'params already hold a stacked {BLOCKS!r} subtree (the scanned layout).')
  if num_blocks < 1:
    raise ValueError(f'num_blocks={num_blocks}: stack at least one block.')
  names = [f'blocks_{i}' for i in range(num_blocks)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f'params have no {", ".join(missing)} to stack (they have {sorted(params)}).')
  trees = [params[n] for n in names]
  structure = jax.tree.structure(trees[0], is_leaf=_is_leaf)
  for n, tree in zip(names, trees, strict=True):
    if jax.tree.structure(tree, is_leaf=_is_leaf) != structure:
      raise ValueError(f'{n} has other parameters than blocks_0: only blocks of the same structure stack.')
  shapes = [[np.shape(getattr(x, 'value', x)) for x in jax.tree.leaves(t, is_leaf=_is_leaf)] for t in trees]
  for n, s in zip(names, shapes, strict=True):
    if s != shapes[0]:
      raise ValueError(f'{n} has other shapes than blocks_0: only blocks of the same shapes stack.')
  stacked = jax.tree.map(lambda *xs: _stack(list(xs)), *trees, is_leaf=_is_leaf)
  out = {k: v for k, v in params.items() if k not in names}
  return {BLOCKS: stacked, **out}


def unstack_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned -> unscanned layout: `blocks` (leaves `[n, ...]`) split into `blocks_0 .. blocks_{n-1}`; other entries
  kept. A last block `blocks_{n}` that was never stacked (MMDiT) keeps its name.

  Raises:
    ValueError: `params` hold no `blocks`, or already a `blocks_i` that the split would give.
  """
  if BLOCKS not in params:
    raise ValueError(f'params hold no stacked {BLOCKS!r} subtree (they are in the unscanned layout).')
  stacked = params[BLOCKS]
  leaves = jax.tree.leaves(stacked, is_leaf=_is_leaf)
  n = {np.shape(getattr(x, 'value', x))[0] for x in leaves}
  if len(n) != 1:
    raise ValueError(f'the stacked blocks disagree on their number: leading axes {sorted(n)}.')
  (n,) = n
  clash = [f'blocks_{i}' for i in range(n) if f'blocks_{i}' in params]
  if clash:
    raise ValueError(f'params hold both the stacked {BLOCKS!r} and {", ".join(clash)}.')
  out = {f'blocks_{i}': jax.tree.map(lambda x, i=i: _unstack(x, i), stacked, is_leaf=_is_leaf) for i in range(n)}
  return {**out, **{k: v for k, v in params.items() if k != BLOCKS}}


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether `params` are in the scanned layout (hold a `blocks` subtree)."""
  return BLOCKS in params


def to_layout(model: Any, params: Mapping[str, Any]) -> dict[str, Any]:
  """`params` of `model`'s architecture, in either layout, converted to the layout of `model.scan_layers` (returned
  as they are, as a dict, when they already have it; a one-block MMDiT has no scanned blocks, one layout)."""
  if model.scan_layers == is_scanned(params) or scanned_depth(model) == 0:
    return dict(params)
  if model.scan_layers:
    return stack_blocks(params, scanned_depth(model))
  return unstack_blocks(params)
