"""Training: state, optimizer and EMA, the pure train step, mesh and shardings."""

from lpl_jax.train.sharding import (
    batch_sharding,
    global_batch,
    init_state,
    jit_train_step,
    make_mesh,
    param_rules,
    replicate,
)
from lpl_jax.train.state import OptimConfig, TrainState, create_state, ema_update, learning_rate, make_optimizer
from lpl_jax.train.step import StepConfig, lpl_term, stratified_timesteps, train_step

__all__ = [
    'OptimConfig', 'StepConfig', 'TrainState', 'batch_sharding', 'create_state', 'ema_update', 'global_batch',
    'init_state',
    'jit_train_step', 'learning_rate', 'lpl_term', 'make_mesh', 'make_optimizer', 'param_rules',
    'replicate', 'stratified_timesteps', 'train_step',
]
