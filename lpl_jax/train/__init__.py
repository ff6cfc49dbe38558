"""Training: state, optimizer and EMA, the pure train step, mesh and shardings, checkpoints; the typed experiment
config (`train.config`, checked by `train.validate`), the objects it describes (`train.build`) and the loop
(`train.loop`); the autoencoder trainer (`train.autoencoder`)."""

from lpl_jax.train.errors import ConfigError, NonFiniteLossError
from lpl_jax.train.sharding import (
  abstract_state,
  batch_sharding,
  global_batch,
  init_state,
  jit_train_step,
  make_mesh,
  mesh_shape,
  param_rules,
  replicate,
  to_host,
)
from lpl_jax.train.state import (
  OptimConfig,
  TrainState,
  create_state,
  ema_update,
  initial_loss_stats,
  learning_rate,
  make_optimizer,
  update_loss_stats,
  variance_ratio,
)
from lpl_jax.train.step import StepConfig, lpl_term, stratified_timesteps, train_step

__all__ = [
  'ConfigError',
  'NonFiniteLossError',
  'OptimConfig',
  'StepConfig',
  'TrainState',
  'abstract_state',
  'batch_sharding',
  'create_state',
  'ema_update',
  'global_batch',
  'init_state',
  'initial_loss_stats',
  'jit_train_step',
  'learning_rate',
  'lpl_term',
  'make_mesh',
  'make_optimizer',
  'mesh_shape',
  'param_rules',
  'replicate',
  'stratified_timesteps',
  'to_host',
  'train_step',
  'update_loss_stats',
  'variance_ratio',
]
