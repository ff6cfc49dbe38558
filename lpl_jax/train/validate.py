"""One place that checks an `Experiment` before anything compiles: every inconsistency that can be found without
running anything, each named by its config field. Values that the library's own constructors check are checked by
building those objects (`train.config.step_config` and friends), their errors named by the config section."""

from __future__ import annotations

import math
import os

import jax
from etils import epath

from lpl_jax import autoencoder as ae_lib
from lpl_jax import diffusion
from lpl_jax import lpl as lpl_lib
from lpl_jax.models.layers import MODULATIONS, REMAT_POLICIES
from lpl_jax.train.build import PYTORCH_CHECKPOINTS, is_pretrained
from lpl_jax.train.config import (
  DATA_KINDS,
  DTYPES,
  MODEL_KINDS,
  Experiment,
  autoencoder_config,
  check,
  formulation,
  from_section,
  latent_shape,
  lpl_config,
  lpl_groups,
  step_config,
  timestep_sampler,
)
from lpl_jax.train.sharding import mesh_shape
from lpl_jax.train.step import LOSS_WEIGHTINGS


def validate(
  exp: Experiment, *, num_devices: int | None = None, process_count: int | None = None, check_files: bool = True
) -> None:
  """Every inconsistency that can be found without running anything, each with a message naming the field.

  Args:
    num_devices, process_count: of the job (default: this one's).
    check_files: also check what needs the files the config names (weights, latent cache, init checkpoint).

  Raises:
    ConfigError: the first problem found.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  _check_loop(exp)
  _check_data_and_model(exp)
  _check_sampling(exp)
  ae_cfg = autoencoder_config(exp.autoencoder)
  _check_shapes(exp, ae_cfg)
  if exp.data.kind == 'cache' and check_files:
    _check_cache(exp, ae_cfg)
  _check_batch(exp, num_devices, process_count)
  loss = lpl_config(exp.lpl)
  if loss is not None:  # the decoder is deep enough (the check make_features_fn makes when the step is traced)
    from_section('lpl', lambda: lpl_lib.make_features_fn(ae_lib.AutoencoderKL(ae_cfg), None, loss))
  if check_files:
    _check_files(exp)
  cfg = step_config(exp, num_devices=num_devices)
  if exp.lpl.enabled:
    group = exp.data.global_batch // cfg.lpl_groups
    threshold = lpl_lib.noise_level_threshold(cfg.lpl, exp.data.resolution, cfg.formulation)
    mass = cfg.sampler.mass_below(cfg.formulation, threshold)
    gate = (
      f't < {cfg.lpl.t_threshold}'
      if cfg.lpl.gate == 'timestep'
      else f'sigma/alpha <= {threshold:g}, lpl.tau={cfg.lpl.tau:g} at {exp.data.resolution} px'
    )
    check(
      cfg.lpl_rows_per_group > 0,
      f'lpl.enabled but no row gets LPL: groups of {group} rows (data.global_batch / lpl.groups) times the '
      f'{mass:.3f} of timesteps the gate lets through ({cfg.lpl.gate}: {gate}) is under one row; use fewer, '
      'larger groups (lpl.groups) or a larger batch.',
    )


def _check_loop(exp: Experiment) -> None:
  for name in ('total_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'num_sample_images'):
    check(getattr(exp, name) > 0, f'{name}={getattr(exp, name)}; expected > 0.')
  check(exp.sample_every >= 0, f'sample_every={exp.sample_every}; expected >= 0 (0: at the end only).')
  ev, pr = exp.eval, exp.profile
  check(ev.every >= 0, f'eval.every={ev.every}; expected >= 0 (0: off).')
  check(ev.num_images > 0, f'eval.num_images={ev.num_images}; expected > 0.')
  check(ev.batch_size >= 0, f'eval.batch_size={ev.batch_size}; expected >= 0 (0: data.global_batch).')
  check(
    ev.features in EVAL_FEATURES,
    f"eval.features={ev.features!r}; expected 'inception' (FID) or 'small_domain' (the embedded photographs).",
  )
  if ev.every:
    check(ev.reference != '', 'eval.every > 0 needs eval.reference (python -m lpl_jax.evaluate --write_reference).')
    check(
      ev.features != 'inception' or ev.inception_weights != '',
      "eval.features='inception' needs eval.inception_weights (pytorch-fid's pt_inception .pth file).",
    )
    check(ev.num_images >= 6, f'eval.num_images={ev.num_images}; density/coverage (k = 5) need at least 6.')
  check(
    pr.start_step >= 0 and pr.num_steps >= 0,
    f'profile: start_step={pr.start_step}, num_steps={pr.num_steps}; expected >= 0 (num_steps 0: off).',
  )
  g = exp.guard
  check(g.loss_spike == 0 or g.loss_spike > 1, f'guard.loss_spike={g.loss_spike}; expected 0 (off) or a factor > 1.')
  check(g.window >= 1, f'guard.window={g.window}; expected >= 1.')
  check(g.max_grad_norm >= 0, f'guard.max_grad_norm={g.max_grad_norm}; expected >= 0 (0: off).')
  lp = exp.lpl
  check(lp.weight == -1 or lp.weight >= 0, f"lpl.weight={lp.weight}; expected >= 0, or -1 for the preset's.")
  check(lp.tau == -1 or lp.tau > 0, f"lpl.tau={lp.tau}; expected > 0, or -1 for the preset's.")
  check(lp.t_threshold == -1 or lp.t_threshold > 0, f'lpl.t_threshold={lp.t_threshold}; expected > 0, or -1.')
  check(
    lp.normalize in ('', 'batch', 'rows'),
    f"lpl.normalize={lp.normalize!r}; expected 'batch', 'rows', or '' for the preset's.",
  )
  st = exp.step
  check(
    st.loss_weighting in LOSS_WEIGHTINGS,
    f'step.loss_weighting={st.loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}.',
  )
  check(
    st.loss_weighting != 'lpl_variance' or lp.enabled,
    "step.loss_weighting='lpl_variance' (Eq. 15) needs lpl.enabled=True: the LPL branch measures the variance it "
    'reads (and is not trained on).',
  )
  check(st.min_snr_gamma > 0, f'step.min_snr_gamma={st.min_snr_gamma}; expected > 0.')
  check(0 <= st.stats_decay < 1, f'step.stats_decay={st.stats_decay}; expected in [0, 1).')
  o = exp.optim
  check(
    not (o.ema_warmup and exp.init.checkpoint and o.ema_start_step == 0),
    f'optim.ema_warmup=True with init.checkpoint={exp.init.checkpoint!r}: the warmup decay min(ema_decay, '
    '(1 + n) / (10 + n)) counts n from 0 in post-training, so it stays below ema_decay for about '
    f"{_warmup_steps(o.ema_decay)} steps while the EMA starts from the checkpoint's, which needs no warmup; set "
    'optim.ema_warmup=False (or optim.ema_start_step, which restarts the EMA from the params and warms up from there).',
  )


def _warmup_steps(decay: float) -> int:
  """The first n at which (1 + n) / (10 + n) reaches `decay`."""
  return int(math.ceil((10 * decay - 1) / (1 - decay))) if decay < 1 else 0


def _check_data_and_model(exp: Experiment) -> None:
  d, m = exp.data, exp.model
  check(
    d.kind in DATA_KINDS, f"data.source={d.source!r}; expected 'embedded', 'folder:PATH', 'tfds:NAME' or 'cache:PATH'."
  )
  check(d.latent_sampling in ('sample', 'mean'), f"data.latent_sampling={d.latent_sampling!r}; 'sample' or 'mean'.")
  check(d.global_batch > 0, f'data.global_batch={d.global_batch}; expected > 0.')
  check(m.kind in MODEL_KINDS, f'model.kind={m.kind!r}; expected one of {MODEL_KINDS}.')
  for field, policy in (('model.remat_policy', m.remat_policy), ('lpl.remat_policy', exp.lpl.remat_policy)):
    check(policy in REMAT_POLICIES, f'{field}={policy!r}; expected one of {REMAT_POLICIES}.')
  check(
    m.modulation in MODULATIONS,
    f"model.modulation={m.modulation!r}; expected 'block' (a modulation Linear per block) or 'single' "
    '(adaLN-single: one shared Linear and a table per block).',
  )
  for field, value in (('model.dtype', m.dtype), ('autoencoder.dtype', exp.autoencoder.dtype)):
    check(value in DTYPES, f'{field}={value!r}; expected one of {sorted(DTYPES)}.')
  check(
    m.hidden_size % m.num_heads == 0,
    f'model.hidden_size={m.hidden_size} is not a multiple of model.num_heads={m.num_heads}.',
  )
  check(
    not m.learn_sigma or m.kind == 'dit',
    'model.learn_sigma=True is for model.kind = dit (the public DiT checkpoints); the MMDiT predicts no variance.',
  )
  check(
    not m.learn_sigma or exp.diffusion.formulation != 'flow_ot',
    'model.learn_sigma=True needs a DDPM formulation: flows have no variance to learn.',
  )
  for field in ('pos_embed_max_size', 'pos_embed_base_size'):
    check(getattr(m, field) >= 0, f'model.{field}={getattr(m, field)}; expected >= 0 (0: none).')
  check(
    m.pos_embed_max_size == 0 or m.kind == 'mmdit',
    "model.pos_embed_max_size (SD3's cropped positions) is for model.kind = mmdit.",
  )
  check(exp.diffusion.vb_weight >= 0, f'diffusion.vb_weight={exp.diffusion.vb_weight}; expected >= 0.')
  if m.text:
    check(m.kind == 'mmdit', 'text conditioning (model.context_dim > 0) needs model.kind = mmdit.')
    check(m.context_len > 0, 'text conditioning needs model.context_len (tokens per caption) > 0.')
    check(
      d.kind == 'cache',
      "text conditioning reads precomputed text embeddings from a latent cache (data.source = 'cache:PATH').",
    )


def _check_sampling(exp: Experiment) -> None:
  form = formulation(exp.diffusion, learn_sigma=exp.model.learn_sigma)
  timestep_sampler(exp.diffusion, form)
  s = exp.sample
  check(s.sampler in diffusion.SAMPLERS, f'sample.sampler={s.sampler!r}; known: {diffusion.SAMPLERS}.')
  check(s.spacing in diffusion.SPACINGS, f'sample.spacing={s.spacing!r}; known: {diffusion.SPACINGS}.')
  check(
    not (exp.diffusion.zero_terminal_snr and not form.is_flow and s.spacing == 'leading'),
    "sample.spacing='leading' with diffusion.zero_terminal_snr: the leading grid never starts at the last timestep, "
    "where the model learned to start (SNR 0); use sample.spacing='trailing' (Lin et al. 2024, section 3.3).",
  )
  check(
    form.is_flow == (s.sampler in ('euler', 'heun', 'rk4')),
    f'sample.sampler={s.sampler!r} does not fit diffusion.formulation={exp.diffusion.formulation!r} (flows '
    'take euler/heun/rk4, DDPM formulations ddim/ddpm).',
  )


def _check_shapes(exp: Experiment, ae_cfg: ae_lib.AutoencoderConfig) -> None:
  factor, res = ae_cfg.downsample_factor, exp.data.resolution
  check(
    res % factor == 0, f"data.resolution={res} is not a multiple of the autoencoder's downsampling factor {factor}."
  )
  latent = res // factor
  check(
    latent % exp.model.patch_size == 0,
    f'the {latent}x{latent} latents (data.resolution={res} / {factor}) do '
    f'not split into model.patch_size={exp.model.patch_size} patches.',
  )


def _check_cache(exp: Experiment, ae_cfg: ae_lib.AutoencoderConfig) -> None:
  from lpl_jax.data import read_index

  index = read_index(exp.data.location)
  shape, expected = tuple(index['latent_shape']), latent_shape(exp)
  check(
    shape == expected,
    f'the latent cache holds {shape} latents but data.resolution={exp.data.resolution} with '
    f'this autoencoder gives {expected}.',
  )
  if exp.model.text:
    text, m = index.get('text_shape'), exp.model
    check(
      text is not None and tuple(text) == (m.context_len, m.context_dim),
      f'model.context_len/context_dim = {(m.context_len, m.context_dim)} but the cache holds text embeddings {text}.',
    )


def _check_batch(exp: Experiment, num_devices: int, process_count: int) -> None:
  """The global batch over processes, devices, accumulation steps and LPL groups."""
  b, accum = exp.data.global_batch, exp.step.accum_steps
  check(accum >= 1, f'step.accum_steps={accum}; expected >= 1.')
  check(
    b % (num_devices * accum) == 0,
    f'data.global_batch={b} does not split over {num_devices} devices x step.accum_steps={accum}.',
  )
  check(b % process_count == 0, f'data.global_batch={b} does not split over {process_count} processes.')
  eb = exp.eval.batch_size
  check(eb % num_devices == 0, f'eval.batch_size={eb} does not split over {num_devices} devices (0: global_batch).')
  from_section('mesh', lambda: mesh_shape(exp.mesh.data, exp.mesh.fsdp, num_devices))
  if exp.lpl.enabled:
    groups = lpl_groups(exp, num_devices)
    check(
      b % groups == 0 and groups % (num_devices * accum) == 0,
      f'lpl.groups={groups} must divide data.global_batch={b} and be a multiple of devices x accum_steps = '
      f'{num_devices * accum}.',
    )


EVAL_FEATURES = ('inception', 'small_domain')


def _check_files(exp: Experiment) -> None:
  weights = exp.autoencoder.weights
  check(
    bool(weights) or exp.autoencoder.allow_random_weights,
    'autoencoder.weights is empty: name a diffusers-format folder, or set autoencoder.allow_random_weights=True '
    '(LPL with a random decoder is meaningless outside tests).',
  )
  check(not weights or os.path.isdir(weights), f'autoencoder.weights={weights!r} is not a folder.')
  ev = exp.eval
  if ev.every:
    for field, path in (('eval.reference', ev.reference), ('eval.inception_weights', ev.inception_weights)):
      check(path == '' or epath.Path(path).is_file(), f'{field}={path!r} is not a file.')
    from lpl_jax.eval.reference import check_reference

    # The reference's extractor and resolution (its header only), before anything compiles.
    header = dict(features=ev.features, resolution=exp.data.resolution, what='reference')
    from_section('eval', lambda: check_reference(ev.reference, **header))
  init = exp.init.checkpoint
  check(
    init != '' or not exp.init.required,
    'this is a post-training config: name the pre-training run with --config.init.checkpoint=WORKDIR.',
  )
  if init.endswith(PYTORCH_CHECKPOINTS):
    check(os.path.isfile(init), f'init.checkpoint={init!r} is not a file.')
  else:
    check(init == '' or os.path.isdir(init), f'init.checkpoint={init!r} is not a folder.')
  if init and is_pretrained(init):
    check(
      not exp.init.keep_optimizer and exp.init.step == -1,
      f'init.checkpoint={init!r} holds pretrained weights, not a run: it has no optimizer state or steps '
      '(init.keep_optimizer=False, init.step=-1).',
    )
