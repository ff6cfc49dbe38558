"""The training state (step, denoiser params, optimizer state, EMA params, rng) and its optimizer and EMA.

Everything here is a pure function of arrays; the state is a pytree that jit, sharding and orbax handle as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, then constant or cosine decay, global-norm clipping, and EMA.

  Attributes:
    lr, warmup_steps, decay_steps (0 = constant after warmup), weight_decay, b1, b2, eps, grad_clip (0 = off).
    ema_decay: paper: 0.9999 without LPL, 0.99975 with.
    ema_warmup: use min(ema_decay, (1 + n) / (10 + n)) early on, n the steps since the EMA started.
    ema_start_step: until this step the EMA equals the params; it averages from then on (the paper's Figure 18
      activates it 50k steps into a post-training run). 0: from the first step.
  """

  lr: float = 1e-4
  warmup_steps: int = 0
  decay_steps: int = 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  ema_decay: float = 0.9999
  ema_warmup: bool = False
  ema_start_step: int = 0

  def __post_init__(self):
    if (
      self.lr <= 0
      or not 0 <= self.ema_decay < 1
      or self.warmup_steps < 0
      or self.decay_steps < 0
      or self.ema_start_step < 0
    ):
      raise ValueError(
        f'invalid optimizer config: lr={self.lr}, ema_decay={self.ema_decay}, warmup_steps={self.warmup_steps}, '
        f'decay_steps={self.decay_steps}, ema_start_step={self.ema_start_step}.'
      )


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
  if cfg.decay_steps:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1), cfg.warmup_steps + cfg.decay_steps)
  if cfg.warmup_steps:
    return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)], [cfg.warmup_steps]
    )
  return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  chain.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*chain)


@flax.struct.dataclass
class TrainState:
  """`loss_stats`: exponential moving averages of the across-row variances of the per-row diffusion and LPL losses
  (`{'diffusion_var', 'lpl_var'}`, float32 scalars, `update_loss_stats`), which Eq. 15's timestep reweighting reads;
  zero until a step has computed LPL."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  loss_stats: Any


LOSS_STATS = ('diffusion_var', 'lpl_var')


def initial_loss_stats() -> dict[str, jax.Array]:
  return {k: jnp.zeros((), jnp.float32) for k in LOSS_STATS}


def update_loss_stats(stats: Any, batch: dict[str, jax.Array], decay: float, on: jax.Array) -> Any:
  """`stats <- decay * stats + (1 - decay) * batch` where `on` (a traced bool), unchanged elsewhere; the first update
  takes the batch's values as they are, so the averages carry no start-up bias towards 0."""
  first = stats['diffusion_var'] == 0
  d = jnp.where(first, 0.0, decay)
  return {k: jnp.where(on, d * stats[k] + (1.0 - d) * batch[k], stats[k]) for k in LOSS_STATS}


def variance_ratio(stats: Any) -> jax.Array:
  """sigma^2_LPL / sigma^2_l2 of Eq. 15 from the running averages; 0 before any."""
  var = stats['diffusion_var']
  return jnp.where(var > 0, stats['lpl_var'] / jnp.where(var > 0, var, 1.0), 0.0)


def create_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state; the EMA starts at the params (copied, so donation never aliases them)."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema_params=jax.tree.map(jnp.copy, params),
    rng=rng,
    loss_stats=initial_loss_stats(),
  )


def ema_update(ema: Any, params: Any, step: jax.Array, cfg: OptimConfig) -> Any:
  """`ema <- d * ema + (1 - d) * params` after the update of `step`: d = ema_decay (with the warmup,
  min(decay, (1 + n) / (10 + n)), n = step - ema_start_step), and d = 0 (the EMA is the params) until
  `ema_start_step`."""
  decay = jnp.asarray(cfg.ema_decay, jnp.float32)
  n = step.astype(jnp.float32) - cfg.ema_start_step
  if cfg.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  if cfg.ema_start_step:
    decay = jnp.where(n > 0, decay, 0.0)
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
