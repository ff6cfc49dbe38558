"""One training step: stratified timesteps, noise, denoiser, diffusion loss, LPL on the K rows below the noise
threshold, update, EMA. A pure function `(state, batch, ae_params) -> (state, metrics)` (docs/train.md); static
things are bound with `functools.partial` by `sharding.jit_train_step`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpl_jax import lpl as lpl_lib
from lpl_jax.autoencoder import AutoencoderKL
from lpl_jax.diffusion import Formulation, TimestepSampler
from lpl_jax.train.state import (
  OptimConfig,
  TrainState,
  ema_update,
  learning_rate,
  update_loss_stats,
  variance_ratio,
)

BATCH_AXES = ('data', 'fsdp')
LOSS_WEIGHTINGS = ('none', 'min_snr', 'lpl_variance')


@dataclasses.dataclass(frozen=True, eq=False)
class StepConfig:
  """Everything static about the step.

  Attributes:
    formulation, sampler: the diffusion formulation and the timestep distribution.
    lpl: the loss config, or None for a step without LPL (nothing of the autoencoder is traced then).
    lpl_rows_per_group: K, rows per stratification group drawn below the noise threshold (`TimestepSampler.split`
      of the group size); the step's LPL rows are `lpl_rows_per_group * lpl_groups`. Without `lpl`, K > 0 only
      stratifies the timesteps the same way (a baseline paired with an LPL run draws the same timesteps as it:
      `step.stratify_timesteps`); the marginal distribution of a row's timestep is the sampler's either way.
    lpl_groups: the global batch is cut into this many equal groups, each starting with its K LPL rows (0 = one
      group per device). Fixing it makes the step's randomness independent of the mesh, so a run on 8 devices and
      one on 1 device with the same `lpl_groups` compute the same thing; it must be a multiple of the device count.
    lpl_start_step: the LPL term counts from this step on (a traced switch: no recompilation when it turns on).
    lpl_chunk: rows per chunk of the LPL branch (0 = all K at once); chunks run one after the other in a
      `lax.map` that computes each chunk's loss and its gradient, so the decoder's activation memory is that of one
      chunk and no FLOPs are added. At SD scale a few rows per chunk are needed to fit (benchmarks/lpl_overhead.py).
    lpl_normalize: `'batch'`: the LPL rows' sum divided by the global batch size (eq. 3's expectation over all
      samples, with the gate zero elsewhere); `'rows'`: divided by the number of LPL rows (the reference code).
    label_dropout: probability of replacing a label by `null_class` (classifier-free guidance training).
    loss_weighting: per-row weights of the diffusion loss: `'none'`; `'min_snr'` (Hang et al. 2023, with
      `min_snr_gamma`, `Formulation.min_snr_weight`); `'lpl_variance'` (the paper's Eq. 15, the baseline of its
      Table 6: rows below the LPL gate weighted by `1 + w_lpl * sigma^2_LPL / sigma^2_l2`, the ratio of the running
      variances in `TrainState.loss_stats`). With `'lpl_variance'` the LPL branch runs as a probe only: its values
      feed the variance, it adds nothing to the loss and has no backward pass. The weights scale the MSE term; with
      a learned variance (`learn_sigma`) the variational bound's term is added unweighted (`Formulation.loss`).
    stats_decay: decay of the running loss variances (updated on every step that computes LPL).
    accum_steps: gradient accumulation: the global batch is processed as this many micro-batches (a `lax.scan`),
      their gradients summed, and the optimizer applied once. Timesteps, noise and label dropout are drawn for the
      whole batch first, so the update equals the one-pass update on the same batch (up to summation order). Each
      micro-batch takes an equal share of every device's rows (no data moves) and whole LPL groups, so
      `lpl_groups / device count` must be a multiple of `accum_steps` (`lpl_groups = 0` picks devices x accum_steps).
  """

  formulation: Formulation
  sampler: TimestepSampler
  optim: OptimConfig
  lpl: lpl_lib.LPLConfig | None = None
  lpl_rows_per_group: int = 0
  lpl_groups: int = 0
  lpl_start_step: int = 0
  lpl_chunk: int = 0
  lpl_normalize: str = 'batch'
  label_dropout: float = 0.1
  null_class: int = 1000
  loss_weighting: str = 'none'
  min_snr_gamma: float = 5.0
  stats_decay: float = 0.99
  accum_steps: int = 1

  def __post_init__(self):
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f'StepConfig.loss_weighting={self.loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}.')
    if self.loss_weighting == 'lpl_variance' and (self.lpl is None or self.lpl_rows_per_group == 0):
      raise ValueError("loss_weighting='lpl_variance' (Eq. 15) needs LPL on, for its gate, weight and variance.")
    if self.min_snr_gamma <= 0 or not 0 <= self.stats_decay < 1:
      raise ValueError(f'min_snr_gamma={self.min_snr_gamma} must be > 0 and stats_decay={self.stats_decay} in [0, 1).')
    if self.lpl_normalize not in ('batch', 'rows'):
      raise ValueError(f"StepConfig.lpl_normalize={self.lpl_normalize!r}; expected 'batch' or 'rows'.")
    if self.lpl_rows_per_group < 0 or self.lpl_chunk < 0:
      raise ValueError('lpl_rows_per_group and lpl_chunk must be >= 0.')
    if self.accum_steps < 1:
      raise ValueError(f'StepConfig.accum_steps={self.accum_steps}; expected >= 1.')


def _local_lpl(
  z0_hat: jax.Array,
  z0: jax.Array,
  ae_params: Any,
  *,
  ae_model: AutoencoderKL,
  cfg: StepConfig,
  groups: int,
  axes: tuple[str, ...] | None,
  probe: bool = False,
):
  """LPL of the first K rows of each of this device's `groups` groups: `(sum of the per-row losses, sum of their
  squares, per-layer sums [3, L] of the per-tap loss, outlier fraction and predicted/target feature std ratio)`,
  summed over devices when `axes` are given (inside shard_map).

  Only the loss sum carries a gradient, to `z0_hat`. It is computed in the forward pass, chunk by chunk (a
  `lax.map`: the decoder's activations are one chunk's), and kept as the residual: the backward pass only scales it,
  so neither decoder branch runs again (a `jax.checkpoint` around each chunk would rerun both forwards). A `probe`
  computes the values only, with no gradient.
  """
  k, chunk = cfg.lpl_rows_per_group * groups, cfg.lpl_chunk or cfg.lpl_rows_per_group * groups
  if k % chunk:
    raise ValueError(f'lpl_chunk={chunk} must divide the {k} LPL rows of each device.')

  def chunks(x):
    rows = x.reshape((groups, -1) + x.shape[1:])[:, : cfg.lpl_rows_per_group]  # [groups, K, ...]: static slices
    return rows.reshape((k // chunk, chunk) + x.shape[1:])

  def unchunk(g, like):  # [k // chunk, chunk, ...] -> like's layout, zero on the rows without LPL
    g = g.reshape((groups, cfg.lpl_rows_per_group) + like.shape[1:])
    rest = jnp.zeros((groups, like.shape[0] // groups - cfg.lpl_rows_per_group) + like.shape[1:], g.dtype)
    return jnp.concatenate([g, rest], axis=1).reshape(like.shape).astype(like.dtype)

  def forward(z0_hat, z0, ae_params, with_grad):
    features_fn = lpl_lib.make_features_fn(ae_model, ae_params, cfg.lpl)

    def chunk_loss(zh, z):
      loss, aux = lpl_lib.lpl_loss(features_fn, zh, z, cfg.lpl)
      per_layer = jnp.stack([jnp.sum(aux[k], 0) for k in ('layer_loss', 'outlier_fraction', 'std_ratio')])
      return jnp.sum(loss), (jnp.sum(jnp.square(loss)), per_layer)

    def one_chunk(args):
      if not with_grad:
        return chunk_loss(*args), None
      return jax.value_and_grad(chunk_loss, has_aux=True)(*args)

    (loss, (sq, per_layer)), grad = jax.lax.map(one_chunk, (chunks(z0_hat), chunks(z0)))
    out = (jnp.sum(loss), jnp.sum(sq), jnp.sum(per_layer, 0))
    return out, (unchunk(grad, z0_hat) if with_grad else None)

  @jax.custom_vjp
  def lpl_sums(z0_hat, z0, ae_params):
    return forward(z0_hat, z0, ae_params, True)[0]

  def lpl_sums_bwd(res, cts):
    grad, z0, ae_params = res
    return (cts[0] * grad, jnp.zeros_like(z0), jax.tree.map(jnp.zeros_like, ae_params))

  def lpl_sums_fwd(z0_hat, z0, ae_params):
    out, grad = forward(z0_hat, z0, ae_params, True)
    return out, (grad, z0, ae_params)

  lpl_sums.defvjp(lpl_sums_fwd, lpl_sums_bwd)
  if probe:
    loss, sq, per_layer = jax.lax.stop_gradient(forward(jax.lax.stop_gradient(z0_hat), z0, ae_params, False)[0])
  else:
    loss, sq, per_layer = lpl_sums(z0_hat, z0, ae_params)
  out = (loss, jax.lax.stop_gradient(sq), jax.lax.stop_gradient(per_layer))  # metrics: no gradient
  if axes:
    out = jax.lax.psum(out, axes)
  return out


def lpl_term(
  z0_hat: jax.Array,
  z0: jax.Array,
  ae_params: Any,
  *,
  ae_model: AutoencoderKL,
  cfg: StepConfig,
  mesh: Mesh | None,
  groups: int,
  probe: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums over all LPL rows of all devices, `(loss, loss squared, per-layer [3, L])` (`_local_lpl`); each device
  works on its local rows (shard_map over the batch)."""
  shards = 1 if mesh is None else mesh.size
  kw = dict(ae_model=ae_model, cfg=cfg, probe=probe)
  if shards == 1:
    return _local_lpl(z0_hat, z0, ae_params, groups=groups, axes=None, **kw)
  fn = jax.shard_map(
    lambda zh, z, p: _local_lpl(zh, z, p, groups=groups // shards, axes=BATCH_AXES, **kw),
    mesh=mesh,
    in_specs=(P(BATCH_AXES), P(BATCH_AXES), P()),
    out_specs=P(),
  )
  return fn(z0_hat, z0, ae_params)


def stratified_timesteps(key: jax.Array, cfg: StepConfig, batch: int, groups: int) -> jax.Array:
  """`[batch]` timesteps whose every block of `batch // groups` rows starts with its K LPL rows."""
  keys = jax.random.split(key, groups)
  draw = jax.vmap(lambda k: cfg.sampler.sample_stratified(k, batch // groups, cfg.lpl_rows_per_group))
  return draw(keys).reshape(batch)


def _microbatches(x: jax.Array, shards: int, accum: int, mesh: Mesh | None) -> jax.Array:
  """`[B, ...] -> [accum, B / accum, ...]`: micro-batch i holds the i-th slice of every device's local rows, in device
  order, so slicing moves no data and each micro-batch stays sharded over all devices."""
  b = x.shape[0]
  x = x.reshape((shards, accum, b // (shards * accum)) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1).reshape((accum, b // accum) + x.shape[3:])
  if mesh is not None and shards > 1:
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
  return x


class Noised(NamedTuple):
  """A batch with everything random about the step drawn: the rows a loss function sees."""

  z0: jax.Array  # [B, h, w, c] clean latents
  eps: jax.Array  # [B, h, w, c] the noise
  z_t: jax.Array  # [B, h, w, c] the noised latents
  t: jax.Array  # [B] timesteps, each group's first K rows below the LPL threshold
  cond: dict[str, jax.Array]  # {'y': labels [B]} or {'context': [B, L, D], 'pooled'?: [B, P]}, after label dropout


def lpl_groups_of(cfg: StepConfig, batch: int, shards: int) -> int:
  """The step's stratification groups; checks that batch, devices, accumulation steps and groups fit together."""
  groups = cfg.lpl_groups or shards * cfg.accum_steps
  split = shards * cfg.accum_steps
  if batch % split or batch % groups or groups % split:
    raise ValueError(
      f'global batch {batch}, {shards} devices, {cfg.accum_steps} accumulation steps and {groups} LPL '
      'groups: the batch must split over devices x accumulation steps and over the groups, and the '
      'groups over devices x accumulation steps.'
    )
  return groups


def noise_batch(
  keys: tuple[jax.Array, jax.Array, jax.Array], batch: dict[str, jax.Array], cfg: StepConfig, groups: int
) -> Noised:
  """Draws the timesteps (stratified when K > 0: LPL on, or a paired baseline), the noise and the label dropout for
  the whole batch from `keys = (t_key, noise_key, drop_key)`, so that gradient accumulation sees the same draws as
  one pass."""
  z0 = batch['latents']
  b = z0.shape[0]
  t_key, noise_key, drop_key = keys
  if cfg.lpl_rows_per_group > 0:
    t = stratified_timesteps(t_key, cfg, b, groups)
  else:
    t = cfg.sampler.sample(t_key, b)
  eps = jax.random.normal(noise_key, z0.shape, z0.dtype)
  drop = jax.random.bernoulli(drop_key, cfg.label_dropout, (b,))
  if 'labels' in batch:
    cond = {'y': jnp.where(drop, cfg.null_class, batch['labels'])}
  else:  # text: a dropped row gets zero embeddings
    cond = {
      k: jnp.where(drop.reshape((b,) + (1,) * (v.ndim - 1)), jnp.zeros_like(v), v)
      for k, v in batch.items()
      if k in ('context', 'pooled')
    }
  return Noised(z0, eps, cfg.formulation.add_noise(z0, eps, t), t, cond)


def lpl_row_mask(batch: int, groups: int, rows_per_group: int) -> jax.Array:
  """`[batch]` True on the LPL rows: the first `rows_per_group` of each of the `groups` equal blocks."""
  return jnp.arange(batch) % (batch // groups) < rows_per_group


def diffusion_weights(cfg: StepConfig, rows: Noised, ratio: jax.Array, active: jax.Array, groups: int) -> jax.Array:
  """Per-row weights `[B]` of the diffusion loss (`StepConfig.loss_weighting`); `ratio` is Eq. 15's
  sigma^2_LPL / sigma^2_l2 and only counts once `active`."""
  b = rows.t.shape[0]
  if cfg.loss_weighting == 'min_snr':
    return cfg.formulation.min_snr_weight(rows.t, cfg.min_snr_gamma)
  if cfg.loss_weighting == 'lpl_variance':
    gated = lpl_row_mask(b, groups, cfg.lpl_rows_per_group)
    return 1.0 + cfg.lpl.weight * ratio * active * gated
  return jnp.ones((b,), jnp.float32)


def loss_fn(
  params: Any,
  rows: Noised,
  ae_params: Any,
  active: jax.Array,
  ratio: jax.Array,
  *,
  model: Any,
  cfg: StepConfig,
  ae_model: AutoencoderKL | None,
  mesh: Mesh | None,
  groups: int,
  batch_size: int,
  accum: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`rows`' share of the step's loss (the sum over the micro-batches is the batch's loss) and its metrics.

  `groups` are this micro-batch's stratification groups, `batch_size` the whole step's rows; `active` (traced)
  switches the LPL term on without recompiling; `ratio` is the variance ratio of Eq. 15 (`diffusion_weights`).
  Metrics under `sums/` are sums over rows, for the running loss variances; `train_step` takes them out.
  """
  form = cfg.formulation
  cond = dict(rows.cond)
  pred = model.apply({'params': params}, rows.z_t, form.model_time(rows.t), cond.pop('y', None), **cond)
  mse, vb = form.loss_terms(pred, rows.z0, rows.eps, rows.t)
  per_row = mse + vb
  diffusion = jnp.mean(per_row) / accum
  # The weighting scales the MSE only (`Formulation.loss`); with learn_sigma the bound's term is added unweighted.
  weighted = jnp.mean(diffusion_weights(cfg, rows, ratio, active, groups) * mse + vb) / accum
  metrics = {'loss/diffusion': diffusion}
  if cfg.lpl is None or cfg.lpl_rows_per_group == 0:
    return weighted, metrics
  z0_hat = form.x0_hat(rows.z_t, pred, rows.t)
  num_layers = len(cfg.lpl.used_layers)
  probe = cfg.loss_weighting == 'lpl_variance'

  def compute(z0_hat):
    return lpl_term(z0_hat, rows.z0, ae_params, ae_model=ae_model, cfg=cfg, mesh=mesh, groups=groups, probe=probe)

  def skip(z0_hat):
    return jnp.zeros(()), jnp.zeros(()), jnp.zeros((3, num_layers))

  lpl_sum, lpl_sq, (layer_sum, frac_sum, ratio_sum) = jax.lax.cond(active, compute, skip, z0_hat)
  lpl_rows = cfg.lpl_rows_per_group * groups * accum  # LPL rows of the whole step
  total = weighted
  if not probe:
    total = total + cfg.lpl.weight * lpl_sum / (batch_size if cfg.lpl_normalize == 'batch' else lpl_rows)
  metrics['loss/lpl'] = lpl_sum / lpl_rows
  for j in range(num_layers):
    metrics[f'lpl/layer_{j}'] = layer_sum[j] / lpl_rows
    metrics[f'lpl/outlier_fraction_{j}'] = frac_sum[j] / lpl_rows
    # > 1: the predicted features vary more than the target's (docs/lpl.md, the normaliser's gradient).
    metrics[f'lpl/std_ratio_{j}'] = ratio_sum[j] / lpl_rows
  stop = jax.lax.stop_gradient
  metrics.update(
    {
      # Eq. 15's sigma^2_l2: the variance of the term its weight scales.
      'sums/diffusion': stop(jnp.sum(mse)),
      'sums/diffusion_sq': stop(jnp.sum(jnp.square(mse))),
      'sums/lpl': stop(lpl_sum),
      'sums/lpl_sq': lpl_sq,
    }
  )
  return total, metrics


def _variance(total: jax.Array, squares: jax.Array, n: int) -> jax.Array:
  mean = total / n
  return jnp.maximum(squares / n - jnp.square(mean), 0.0)


def accumulated_grads(
  grad_fn: Callable, params: Any, rows: Noised, *, shards: int, accum: int, mesh: Mesh | None
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """`(loss, metrics, grads)` summed over `accum` micro-batches (a `lax.scan`); one pass when `accum == 1`."""
  if accum == 1:
    (total, metrics), grads = grad_fn(params, rows)
    return total, metrics, grads

  def body(carry, micro):
    (total, metrics), grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (total, metrics, grads)), None

  micro = jax.tree.map(lambda x: _microbatches(x, shards, accum, mesh), rows)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(
    lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(lambda: (*grad_fn(params, first)[0], params))
  )
  (total, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
  return total, metrics, grads


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  ae_params: Any,
  *,
  model: Any,
  optimizer: optax.GradientTransformation,
  cfg: StepConfig,
  ae_model: AutoencoderKL | None = None,
  mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step; `ae_params` are frozen.

  `batch`: `{'latents': [B, h, w, c] (scaled), 'labels': [B]}` for class-conditional denoisers, or
  `{'latents', 'context': [B, L, D]}` (plus optionally `'pooled': [B, P]`) of precomputed text embeddings for
  text-conditional ones; label dropout replaces a label by `null_class`, or zeroes a row's text embeddings.
  """
  if ('labels' in batch) == ('context' in batch):
    raise ValueError(f"the batch needs one of 'labels' (class-conditional) or 'context' (text); got {sorted(batch)}.")
  b, accum = batch['latents'].shape[0], cfg.accum_steps
  shards = 1 if mesh is None else mesh.size
  groups = lpl_groups_of(cfg, b, shards)
  rng, *keys = jax.random.split(state.rng, 4)
  rows = noise_batch(tuple(keys), batch, cfg, groups)
  active = state.step >= cfg.lpl_start_step
  bound = functools.partial(
    loss_fn,
    ae_params=ae_params,
    active=active,
    ratio=variance_ratio(state.loss_stats),
    model=model,
    cfg=cfg,
    ae_model=ae_model,
    mesh=mesh,
    groups=groups // accum,
    batch_size=b,
    accum=accum,
  )
  grad_fn = jax.value_and_grad(bound, has_aux=True)
  total, metrics, grads = accumulated_grads(grad_fn, state.params, rows, shards=shards, accum=accum, mesh=mesh)
  loss_stats = state.loss_stats
  if cfg.lpl is not None and cfg.lpl_rows_per_group > 0:
    sums = {k: metrics.pop(f'sums/{k}') for k in ('diffusion', 'diffusion_sq', 'lpl', 'lpl_sq')}
    lpl_rows = cfg.lpl_rows_per_group * groups
    batch_vars = {
      'diffusion_var': _variance(sums['diffusion'], sums['diffusion_sq'], b),
      'lpl_var': _variance(sums['lpl'], sums['lpl_sq'], lpl_rows),
    }
    loss_stats = update_loss_stats(loss_stats, batch_vars, cfg.stats_decay, active)
    metrics.update(
      {
        # Eq. 15's sigma^2_LPL / sigma^2_l2 of the running variances, after this step (docs/lpl.md).
        'lpl/variance_ratio': variance_ratio(loss_stats),
        'lpl/rows': jnp.asarray(cfg.lpl_rows_per_group * groups * active, jnp.int32),
        # The share of the batch the gate lets through: what LPL costs (docs/reproduce.md).
        'lpl/rows_fraction': jnp.asarray(cfg.lpl_rows_per_group * groups / b, jnp.float32) * active,
        'lpl/active': active.astype(jnp.int32),
      }
    )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  new_state = state.replace(
    step=step,
    params=params,
    opt_state=opt_state,
    rng=rng,
    ema_params=ema_update(state.ema_params, params, step, cfg.optim),
    loss_stats=loss_stats,
  )
  metrics.update(
    {
      'loss/total': total,
      'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params),  # after the update: the params a checkpoint of this step holds
      'lr': jnp.asarray(learning_rate(cfg.optim)(state.step), jnp.float32),
    }
  )
  return new_state, metrics
