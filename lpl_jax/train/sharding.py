"""Mesh, shardings and the compiled step.

A `Mesh` with axes `('data', 'fsdp')`. The batch is sharded over both axes. Denoiser params (and with them the
optimizer state and EMA) follow their logical axis names (`lpl_jax.models.axes`): replicated, or sharded along
`fsdp` with `axes.fsdp_rules()` (ZeRO-3 style). The frozen autoencoder params are replicated. The state is created
directly in its sharded layout (`jax.jit(..., out_shardings=...)` on shapes from `jax.eval_shape`), and the step is
`jax.jit` with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpl_jax.models import axes
from lpl_jax.train import step as step_lib
from lpl_jax.train.state import TrainState, create_state


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """`(data, fsdp)` covering `num_devices`; `data=-1` takes what `fsdp` leaves."""
  if fsdp < 1 or (data == -1 and num_devices % fsdp):
    raise ValueError(f'mesh fsdp={fsdp} does not divide the {num_devices} devices.')
  if data == -1:
    data = num_devices // fsdp
  if data * fsdp != num_devices:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} does not cover the {num_devices} devices.')
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
  """`Mesh(('data', 'fsdp'))` over all (or the given) devices; `data=-1` takes what `fsdp` leaves."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(mesh_shape(data, fsdp, len(devices))), step_lib.BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(step_lib.BATCH_AXES))


def global_batch(local: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's rows (multi-host): process p passes its contiguous share of the
  global batch, `B / process_count` rows, as host arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one NumPy array, on every process. Every process must call it: an array with shards on
  other hosts is all-gathered (`process_allgather`), since one process may not `device_get` what it does not hold.
  Sample images, evaluation features and anything else a host writes come through here."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) -> arrays replicated on every device of the mesh (frozen
  autoencoder params)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree
  )


def param_rules(fsdp: bool) -> tuple:
  """Logical-to-mesh rules: FSDP over the `fsdp` axis, or (empty rules) everything replicated."""
  return axes.fsdp_rules() if fsdp else ((axes.LAYERS, None),)  # a scanned model's stacked blocks: unsharded


def activation_rules(fsdp: bool) -> tuple:
  """The rules the models' activation constraints (`with_logical_constraint`) read: the batch over every mesh axis
  (without a rule for it, a constraint would replicate the batch), with FSDP the parameter rules too."""
  return axes.fsdp_rules() if fsdp else ((axes.BATCH, step_lib.BATCH_AXES),)


@contextlib.contextmanager
def tracing_context(mesh: Mesh, *, fsdp: bool):
  """The mesh and logical axis rules in force while a step is traced, so that `layers.constrain_tokens` and every
  `with_logical_constraint` in the models become sharding constraints (outside it they are no-ops)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(fsdp)):
    yield


def _state_fn(
  init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, key: jax.Array
) -> tuple[Callable[[jax.Array], TrainState], jax.Array]:
  """`(param_key -> boxed state, param_key)`: the state `init_state` creates from `key`."""
  param_key, rng = jax.random.split(key)
  return (lambda k: create_state(init_params(k), optimizer, rng)), param_key


def abstract_state(
  init_params: Callable[[jax.Array], Any],
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  *,
  fsdp: bool,
  key: jax.Array | None = None,
) -> tuple[TrainState, Any]:
  """The state's shapes, dtypes and shardings, with nothing allocated (`jax.eval_shape`).

  Args:
    init_params: `key -> params` as `model.init(...)['params']` returns them (boxed with logical axis names).
    fsdp: shard the params (and with them the optimizer state and EMA) over the mesh's `fsdp` axis.

  Returns:
    `(state of jax.ShapeDtypeStruct with their shardings, state_shardings)`: the target of a checkpoint restore, the
    input of a lowering, and the `out_shardings` that `init_state` creates the state with.
  """
  make, param_key = _state_fn(init_params, optimizer, jax.random.key(0) if key is None else key)
  boxed = jax.eval_shape(make, param_key)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, param_rules(fsdp))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return state, shardings


def init_state(
  init_params: Callable[[jax.Array], Any],
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  mesh: Mesh,
  *,
  fsdp: bool,
) -> tuple[TrainState, Any]:
  """Creates the state directly in its sharded layout (see `abstract_state`).

  Returns:
    `(state, state_shardings)`; the state holds plain arrays.
  """
  _, shardings = abstract_state(init_params, optimizer, mesh, fsdp=fsdp, key=key)
  make, param_key = _state_fn(init_params, optimizer, key)
  state = jax.jit(lambda k: nn.unbox(make(k)), out_shardings=shardings)(param_key)
  return state, shardings


def jit_train_step(state_shardings: Any, mesh: Mesh, **static: Any) -> Callable:
  """`train_step` bound to its static arguments, jitted with explicit shardings and the state donated:
  `(state, batch, ae_params) -> (state, metrics)`."""
  replicated = NamedSharding(mesh, P())
  fn = functools.partial(step_lib.train_step, mesh=mesh, **static)
  return jax.jit(
    fn,
    in_shardings=(state_shardings, batch_sharding(mesh), replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )
