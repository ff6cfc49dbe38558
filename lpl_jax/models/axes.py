"""Logical axis names of the denoisers' parameters and activations, and suggested logical-to-mesh rules.

Every kernel and embedding table is created with `nn.with_logical_partitioning(init, names)`, so `model.init`
returns `nn.LogicallyPartitioned` boxes; `nn.get_partition_spec(boxed)` gives the logical names of each
parameter, and `nn.logical_to_mesh_sharding(spec, mesh, rules)` turns them into shardings. Biases and the
QK-norm scales are named too (after their output axis), so they can follow their kernel or stay replicated.

A name occurs at most once per array (flax rejects duplicates), which is why square kernels name their two sides
differently (`MLP` in, `EMBED` out for the timestep MLP's second layer; `EMBED` in, `ADALN` out for the
modulations).

Glossary:
  BATCH    examples in the batch (activations only).
  LENGTH   tokens: image patches, context tokens, or the joint sequence (activations only).
  EMBED    the model width: the residual stream and the conditioning vector `c` (hidden_size).
  MLP      the hidden width of an MLP: the blocks' 4x MLP, the timestep and pooled-text MLPs.
  HEADS    attention heads.
  KV       the per-head width (hidden_size // num_heads), of queries, keys and values alike.
  ADALN    the stacked shift/scale/gate outputs of an adaLN modulation (6 x or 2 x the width).
  CLASSES  rows of a class-embedding table (num_classes + 1: the last row is the null class).
  PATCH    the pixels of one flattened patch, p * p * channels (patch embedding in, final projection out).
  FREQ     the sinusoidal features of the timestep (256).
  TEXT     the width of precomputed text-encoder features (context_dim, pooled_dim).
  LAYERS   the blocks of a scanned model (`scan_layers=True`): the leading axis of its stacked block params
           (`lpl_jax.models.scan`); unsharded by the rules here.
"""

from __future__ import annotations

BATCH = 'batch'
LENGTH = 'length'
EMBED = 'embed'
MLP = 'mlp'
HEADS = 'heads'
KV = 'kv'
ADALN = 'adaln'
CLASSES = 'classes'
PATCH = 'patch'
FREQ = 'freq'
TEXT = 'text'
LAYERS = 'layers'

PARAM_AXES = (EMBED, MLP, HEADS, KV, ADALN, CLASSES, PATCH, FREQ, TEXT, LAYERS)


def fsdp_rules(fsdp: str = 'fsdp', data: str | tuple[str, ...] = ('data', 'fsdp')) -> tuple[tuple[str, object], ...]:
  """Logical-to-mesh rules that shard every kernel and embedding table along one dimension over `fsdp` (ZeRO-3).

  Every kernel and table names `EMBED` or `MLP` on one side (for the standard sizes these widths, like the `ADALN`
  ones, are multiples of 128); flax assigns a mesh axis at most once per array, in rule order, so a `[MLP, EMBED]`
  kernel is sharded on `EMBED`. Biases follow their output axis when it is one of these; the rest (qkv biases, the
  final projection's bias, QK-norm scales) and every axis whose size need not divide the mesh (`CLASSES` = 1001
  rows, `PATCH`, `FREQ`, `TEXT`) stay replicated, and so does the `LAYERS` axis of a scanned model's stacked blocks
  (each device holds its shard of every block). Activations are sharded over the batch on `data`.

  Args:
    fsdp: the mesh axis that parameters are sharded over.
    data: the mesh axis or axes that the batch is sharded over.

  Returns:
    `((logical_name, mesh_axes), ...)` for `nn.logical_to_mesh_sharding` / `nn.logical_axis_rules`.
  """
  return ((BATCH, data), (LAYERS, None), (EMBED, fsdp), (MLP, fsdp), (ADALN, fsdp))
