"""An experiment from an `ml_collections` config: the base config every file in `configs/` starts from, its
validation (every error before anything compiles), and the objects it describes.

Config layout (every field is documented in docs/configs.md):

  seed, total_steps, log_every, checkpoint_every, keep_checkpoints, sample_every, num_sample_images, progress
  data:        source, split, data_dir, resolution, global_batch, shuffle, random_flip, random_crop, num_samples,
               worker_count, prefetch, latent_sampling
  autoencoder: preset, weights, dtype, remat, allow_random_weights
  model:       kind (dit | mmdit), patch_size, hidden_size, depth, num_heads, mlp_ratio, num_classes, context_dim,
               context_len, pooled_dim, qk_norm, dtype, remat
  diffusion:   formulation, schedule, beta_start, beta_end, zero_terminal_snr, timesteps, logit_mean, logit_std,
               mode_scale, shift
  optim:       lr, warmup_steps, decay_steps, weight_decay, b1, b2, eps, grad_clip, ema_decay, ema_warmup
  lpl:         enabled, preset, weight, tau, start_step, chunk, normalize, groups, remat, num_blocks
  step:        label_dropout, accum_steps
  mesh:        data, fsdp, shard_params
  init:        checkpoint, step, keep_optimizer, required
  sample:      sampler, steps, guidance, eta, use_ema
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lpl_jax import autoencoder as ae_lib
from lpl_jax import diffusion, train
from lpl_jax import lpl as lpl_lib
from lpl_jax.models.dit import DiT
from lpl_jax.models.mmdit import MMDiT

log = logging.getLogger(__name__)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODEL_KINDS = ('dit', 'mmdit')


def base_config() -> ml_collections.ConfigDict:
  """Defaults; a config file overrides what its experiment sets. Fields use '' / 0 for "none" so that every one can
  be overridden from the command line with its type."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.sample_every = 0  # 0: sample grids only at the end
  c.num_sample_images = 16
  c.progress = True

  c.data = ml_collections.ConfigDict(dict(
      source='embedded',  # 'embedded' | 'folder:PATH' | 'tfds:NAME' | 'cache:PATH' (latents from lpl_jax.encode)
      split='train', data_dir='', resolution=256, global_batch=256, shuffle=True, random_flip=True,
      random_crop=False, num_samples=0, worker_count=0, prefetch=4,
      latent_sampling='sample',  # images and caches with std: 'sample' z ~ posterior, or 'mean'
  ))
  c.autoencoder = ml_collections.ConfigDict(dict(
      preset='sd1',  # the architecture when `weights` is empty (random weights: only with allow_random_weights)
      weights='',  # a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors)
      dtype='float32', remat=True, allow_random_weights=False,
  ))
  c.model = ml_collections.ConfigDict(dict(
      kind='mmdit', patch_size=2, hidden_size=1536, depth=28, num_heads=24, mlp_ratio=4.0, num_classes=1000,
      context_dim=0, context_len=0, pooled_dim=0,  # context_dim > 0: text-conditional (cached text embeddings)
      qk_norm=False, dtype='bfloat16', remat=True,
  ))
  c.diffusion = ml_collections.ConfigDict(dict(
      formulation='ddpm_eps', schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, zero_terminal_snr=False,
      timesteps='uniform', logit_mean=0.0, logit_std=1.0, mode_scale=1.29, shift=1.0,
  ))
  c.optim = ml_collections.ConfigDict(dataclasses.asdict(train.OptimConfig()))
  c.lpl = ml_collections.ConfigDict(dict(
      enabled=False, preset='paper', weight=3.0, tau=5.0, start_step=0, chunk=0, normalize='batch', groups=0,
      remat=True, num_blocks=4,
  ))
  c.step = ml_collections.ConfigDict(dict(label_dropout=0.1, accum_steps=1))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_params=False))
  c.init = ml_collections.ConfigDict(dict(
      checkpoint='',  # post-training: a pre-training workdir (or its checkpoints/ folder) to start from
      step=-1,  # -1: its latest checkpoint
      keep_optimizer=False,  # also take its optimizer state (else fresh); params and EMA are always taken
      required=False,  # post-training configs set it: starting without init.checkpoint is then an error
  ))
  c.sample = ml_collections.ConfigDict(dict(sampler='ddim', steps=50, guidance=1.5, eta=0.0, use_ema=True))
  return c


def parse_variant(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """`'post512,lpl,v'` -> the flags and values of a config file's variant string.

  Tokens: `pretrain<res>` / `post<res>` (phase and resolution), `lpl`, and a formulation `eps`, `v` or `flow`.
  """
  out = dict(defaults)
  for token in filter(None, (arg or '').split(',')):
    for phase in ('pretrain', 'post'):
      if token.startswith(phase) and token[len(phase):].isdigit():
        out['phase'], out['res'] = phase, int(token[len(phase):])
        break
    else:
      if token == 'lpl':
        out['lpl'] = True
      elif token in ('eps', 'v', 'flow'):
        out['formulation'] = token
      else:
        raise ValueError(f'unknown config variant token {token!r} in {arg!r}; expected pretrain<res>, post<res>, lpl, '
                         'eps, v or flow.')
  return out


FORMULATION_NAMES = {'eps': 'ddpm_eps', 'v': 'ddpm_v', 'flow': 'flow_ot'}


def set_formulation(c: ml_collections.ConfigDict, name: str) -> None:
  """The paper's setting for each formulation (section 4.1): DDPM with the quadratic schedule; v with zero-terminal
  SNR; flows with the OT path, SD3's mode sampling and the Euler sampler."""
  c.diffusion.formulation = FORMULATION_NAMES[name]
  c.diffusion.zero_terminal_snr = name == 'v'
  if name == 'flow':
    c.diffusion.timesteps = 'mode'
    c.sample.sampler = 'euler'


PAPER_STEPS = {('pretrain', 256): 600_000, ('post', 256): 200_000, ('post', 512): 120_000}


def paper_recipe(v: dict[str, Any]) -> ml_collections.ConfigDict:
  """What every paper config shares (`configs/imagenet.py`, `configs/cc12m.py`), for a parsed variant `v`
  (`parse_variant`); the config files add their data and conditioning. Their docstrings say which values the paper
  states and which were chosen here."""
  if (v['phase'], v['res']) not in PAPER_STEPS:
    raise ValueError(f"no paper run for phase {v['phase']!r} at {v['res']} px: pre-training is at 256 px, "
                     'post-training at 256 or 512 px.')
  if v['phase'] == 'pretrain' and v['lpl']:
    raise ValueError('pre-training runs without LPL (use post<res>,lpl).')
  c = base_config()
  c.total_steps = PAPER_STEPS[v['phase'], v['res']]
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.sample_every = 10_000
  c.data.resolution = v['res']
  c.data.global_batch = 256
  c.autoencoder.preset = 'sd1'  # the architecture; the weights come from autoencoder.weights
  c.autoencoder.remat = True
  c.model.kind = 'mmdit'
  c.model.dtype = 'bfloat16'
  c.model.remat = True
  set_formulation(c, v['formulation'])
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1_000 if v['phase'] == 'pretrain' else 0
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.99975 if v['lpl'] else 0.9999
  c.lpl.enabled = v['lpl']
  c.lpl.weight = 3.0
  c.lpl.tau = 5.0
  c.lpl.chunk = 1  # one row at a time through the decoder: bounded memory, same FLOPs (benchmarks/lpl_overhead.py)
  c.sample.steps = 50
  c.sample.guidance = 1.5 if v['res'] == 256 else 2.0
  c.init.required = v['phase'] == 'post'
  return c


DEMO_VARIANTS = ('pretrain', 'post', 'post,lpl', 'pretrain,flow', 'post,lpl,flow', 'pretrain,v', 'post,lpl,v')


def demo_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's recipe in miniature on the embedded photographs at 32 px, for a 2-core CPU (`configs/demo_cpu.py`
  and `make demo`). Variants: `pretrain` or `post` (phase), `lpl`, and `eps` / `v` / `flow`."""
  tokens = [t for t in (arg or 'pretrain').split(',') if t]
  phase = 'post' if 'post' in tokens else 'pretrain'
  v = parse_variant(','.join(t for t in tokens if t not in ('pretrain', 'post')), lpl=False, formulation='eps')
  c = base_config()
  c.total_steps = 1500 if phase == 'pretrain' else 300
  c.log_every = 10
  c.checkpoint_every = 250
  c.num_sample_images = 16

  c.data.source = 'embedded'
  c.data.resolution = 32
  c.data.global_batch = 16
  c.data.num_samples = 4096
  c.data.random_crop = True

  c.autoencoder.preset = 'tiny'  # random weights unless autoencoder.weights names a trained one (make demo does)
  c.autoencoder.allow_random_weights = True
  c.autoencoder.remat = False

  c.model.kind = 'dit'
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.num_classes = 16  # at least the number of embedded photographs (their index is the class)
  c.model.dtype = 'float32'
  c.model.remat = False

  set_formulation(c, v['formulation'])
  c.optim.lr = 5e-4 if phase == 'pretrain' else 2e-4
  c.optim.warmup_steps = 50 if phase == 'pretrain' else 0
  c.optim.ema_decay = 0.995 if v['lpl'] else 0.998  # the paper's ratio of EMA half-lives (0.99975 vs 0.9999)
  c.optim.ema_warmup = True

  c.lpl.enabled = v['lpl']
  c.lpl.remat = False
  c.sample.steps = 25
  c.sample.guidance = 1.5
  return c


class ConfigError(ValueError):
  """A config that cannot run; raised before anything compiles."""


def _check(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None, check_files: bool = True) -> None:
  """Every inconsistency that can be found without running anything, each with a message naming the field.

  `check_files=False` skips what needs the files a config names (weights, latent cache, init checkpoint)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  d, m = c.data, c.model
  _check(c.total_steps > 0, f'total_steps={c.total_steps}; expected > 0.')
  for name in ('log_every', 'checkpoint_every'):
    _check(c[name] > 0, f'{name}={c[name]}; expected > 0.')
  _check(c.sample_every >= 0 and c.num_sample_images > 0, 'sample_every must be >= 0 and num_sample_images > 0.')
  kind = d.source.split(':', 1)[0]
  _check(kind in ('embedded', 'folder', 'tfds', 'cache'),
         f"data.source={d.source!r}; expected 'embedded', 'folder:PATH', 'tfds:NAME' or 'cache:PATH'.")
  _check(d.latent_sampling in ('sample', 'mean'), f"data.latent_sampling={d.latent_sampling!r}; 'sample' or 'mean'.")
  _check(m.kind in MODEL_KINDS, f'model.kind={m.kind!r}; expected one of {MODEL_KINDS}.')
  for field, value in (('model.dtype', m.dtype), ('autoencoder.dtype', c.autoencoder.dtype)):
    _check(value in DTYPES, f'{field}={value!r}; expected one of {sorted(DTYPES)}.')
  _check(m.hidden_size % m.num_heads == 0, f'model.hidden_size={m.hidden_size} is not a multiple of model.num_heads='
         f'{m.num_heads}.')
  if m.context_dim:
    _check(m.kind == 'mmdit', 'text conditioning (model.context_dim > 0) needs model.kind = mmdit.')
    _check(m.context_len > 0, 'text conditioning needs model.context_len (tokens per caption) > 0.')
    _check(kind == 'cache', 'text conditioning reads precomputed text embeddings from a latent cache '
           "(data.source = 'cache:PATH').")
  _check(c.diffusion.formulation in diffusion.FORMULATIONS,
         f'diffusion.formulation={c.diffusion.formulation!r}; known: {diffusion.FORMULATIONS}.')
  _check(c.sample.sampler in diffusion.SAMPLERS, f'sample.sampler={c.sample.sampler!r}; known: {diffusion.SAMPLERS}.')
  flow = c.diffusion.formulation == 'flow_ot'
  _check(flow == (c.sample.sampler in ('euler', 'heun', 'rk4')),
         f'sample.sampler={c.sample.sampler!r} does not fit diffusion.formulation={c.diffusion.formulation!r} (flows '
         'take euler/heun/rk4, DDPM formulations ddim/ddpm).')
  # Shapes: the autoencoder's downsampling and channels against the data and the denoiser.
  ae_cfg = autoencoder_config(c)
  factor = ae_cfg.downsample_factor
  _check(d.resolution % factor == 0, f'data.resolution={d.resolution} is not a multiple of the autoencoder\'s '
         f'downsampling factor {factor}.')
  latent = d.resolution // factor
  _check(latent % m.patch_size == 0, f'the {latent}x{latent} latents (data.resolution={d.resolution} / {factor}) do '
         f'not split into model.patch_size={m.patch_size} patches.')
  if kind == 'cache' and check_files:
    from lpl_jax import data as data_lib  # noqa: PLC0415 - only to read the cache's index
    index = data_lib.read_index(d.source.split(':', 1)[1])
    shape = tuple(index['latent_shape'])
    _check(shape == (latent, latent, ae_cfg.latent_channels),
           f'the latent cache holds {shape} latents but data.resolution={d.resolution} with this autoencoder gives '
           f'{(latent, latent, ae_cfg.latent_channels)}.')
    if m.context_dim:
      text = index.get('text_shape')
      _check(text is not None and tuple(text) == (m.context_len, m.context_dim),
             f'model.context_len/context_dim = {(m.context_len, m.context_dim)} but the cache holds text embeddings '
             f'{text}.')
  # The batch over devices, accumulation steps and LPL groups.
  accum = c.step.accum_steps
  _check(accum >= 1, f'step.accum_steps={accum}; expected >= 1.')
  _check(d.global_batch % (num_devices * accum) == 0, f'data.global_batch={d.global_batch} does not split over '
         f'{num_devices} devices x step.accum_steps={accum}.')
  _check(d.global_batch % jax.process_count() == 0, f'data.global_batch={d.global_batch} does not split over '
         f'{jax.process_count()} processes.')
  mesh_devices = (num_devices // c.mesh.fsdp if c.mesh.data == -1 else c.mesh.data) * c.mesh.fsdp
  _check(mesh_devices == num_devices and num_devices % c.mesh.fsdp == 0,
         f'mesh.data={c.mesh.data} x mesh.fsdp={c.mesh.fsdp} does not cover the {num_devices} devices.')
  if c.lpl.enabled:
    groups = c.lpl.groups or num_devices * accum
    _check(d.global_batch % groups == 0 and groups % (num_devices * accum) == 0,
           f'lpl.groups={groups} must divide data.global_batch={d.global_batch} and be a multiple of devices x '
           f'accum_steps = {num_devices * accum}.')
    _check(0 < c.lpl.num_blocks <= len(ae_cfg.block_out_channels),
           f'lpl.num_blocks={c.lpl.num_blocks}; the decoder has {len(ae_cfg.block_out_channels)} blocks.')
  if check_files:
    _check(bool(c.autoencoder.weights) or c.autoencoder.allow_random_weights,
           'autoencoder.weights is empty: name a diffusers-format folder, or set autoencoder.allow_random_weights=True '
           '(LPL with a random decoder is meaningless outside tests).')
    if c.autoencoder.weights:
      _check(os.path.isdir(c.autoencoder.weights), f'autoencoder.weights={c.autoencoder.weights!r} is not a folder.')
    _check(c.init.checkpoint != '' or not c.init.required,
           'this is a post-training config: name the pre-training run with --config.init.checkpoint=WORKDIR.')
    _check(c.init.checkpoint == '' or os.path.isdir(c.init.checkpoint),
           f'init.checkpoint={c.init.checkpoint!r} is not a folder.')
  # Constructing the dataclasses checks the remaining values (sampler kinds, optimizer, LPL fields).
  try:
    cfg = step_config(c, num_devices=num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if c.lpl.enabled:
    group = d.global_batch // cfg.lpl_groups
    mass = cfg.sampler.mass_below(cfg.formulation, lpl_lib.noise_level_threshold(cfg.lpl, d.resolution))
    _check(cfg.lpl_rows > 0, f'lpl.enabled but no row gets LPL: groups of {group} rows (data.global_batch / '
           f'lpl.groups) times the {mass:.3f} of timesteps below the noise threshold (lpl.tau={c.lpl.tau} at '
           f'{d.resolution} px) is under one row; use fewer, larger groups (lpl.groups) or a larger batch.')


def autoencoder_config(c: ml_collections.ConfigDict) -> ae_lib.AutoencoderConfig:
  if c.autoencoder.weights and os.path.isdir(c.autoencoder.weights):
    return ae_lib.read_config(c.autoencoder.weights)
  if c.autoencoder.preset not in ae_lib.PRESETS:
    raise ConfigError(f'autoencoder.preset={c.autoencoder.preset!r}; known: {sorted(ae_lib.PRESETS)}.')
  return ae_lib.PRESETS[c.autoencoder.preset]


def load_autoencoder(c: ml_collections.ConfigDict) -> tuple[ae_lib.AutoencoderKL, Any]:
  """The frozen autoencoder and its host params (from `weights`, or random from `seed` when allowed)."""
  dtype = DTYPES[c.autoencoder.dtype]
  if c.autoencoder.weights:
    model, params = ae_lib.from_diffusers(c.autoencoder.weights, dtype=dtype)
  else:
    log.warning('autoencoder: RANDOM weights (preset %s); LPL and samples are meaningless.', c.autoencoder.preset)
    model = ae_lib.from_preset(c.autoencoder.preset, dtype=dtype)
    params = jax.device_get(jax.jit(lambda k: ae_lib.init_params(model, k))(jax.random.key(c.seed + 1)))
  return model, params


def make_model(c: ml_collections.ConfigDict, latent_channels: int):
  m = c.model
  kw = dict(patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio, in_channels=latent_channels, dtype=DTYPES[m.dtype], remat=m.remat)
  if m.kind == 'dit':
    return DiT(num_classes=m.num_classes, **kw)
  return MMDiT(num_classes=m.num_classes, context_dim=m.context_dim or None, pooled_dim=m.pooled_dim or None,
               qk_norm=m.qk_norm, **kw)


def formulation(c: ml_collections.ConfigDict) -> diffusion.Formulation:
  dc = c.diffusion
  return diffusion.get_formulation(dc.formulation, schedule=dc.schedule, beta_start=dc.beta_start,
                                   beta_end=dc.beta_end, zero_terminal_snr=dc.zero_terminal_snr)


def lpl_config(c: ml_collections.ConfigDict) -> lpl_lib.LPLConfig | None:
  if not c.lpl.enabled:
    return None
  return lpl_lib.LPLConfig.from_preset(c.lpl.preset, weight=c.lpl.weight, tau=c.lpl.tau, remat=c.lpl.remat,
                                       num_blocks=c.lpl.num_blocks)


def step_config(c: ml_collections.ConfigDict, *, num_devices: int | None = None) -> train.StepConfig:
  """The train step's static config; K (LPL rows per group) from the timestep distribution's mass below the
  noise threshold at this resolution."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  form = formulation(c)
  dc = c.diffusion
  sampler = diffusion.TimestepSampler(kind=dc.timesteps, num_timesteps=None if form.is_flow else form.num_timesteps,
                                      logit_mean=dc.logit_mean, logit_std=dc.logit_std, mode_scale=dc.mode_scale,
                                      shift=dc.shift)
  lcfg = lpl_config(c)
  groups = rows = 0
  if lcfg is not None:
    groups = c.lpl.groups or num_devices * c.step.accum_steps
    rows = sampler.split(form, lpl_lib.noise_level_threshold(lcfg, c.data.resolution), c.data.global_batch // groups)
  return train.StepConfig(form, sampler, train.OptimConfig(**c.optim.to_dict()), lpl=lcfg, lpl_rows=rows,
                          lpl_groups=groups, lpl_start_step=c.lpl.start_step, lpl_chunk=c.lpl.chunk,
                          lpl_normalize=c.lpl.normalize, label_dropout=c.step.label_dropout,
                          null_class=c.model.num_classes, accum_steps=c.step.accum_steps)


def latent_shape(c: ml_collections.ConfigDict) -> tuple[int, int, int]:
  ae_cfg = autoencoder_config(c)
  side = c.data.resolution // ae_cfg.downsample_factor
  return side, side, ae_cfg.latent_channels


def model_inputs(c: ml_collections.ConfigDict, batch: int) -> tuple[tuple, dict]:
  """Dummy inputs of the denoiser (for `init` and abstract shapes): `(args, kwargs)`."""
  x = jnp.zeros((batch, *latent_shape(c)))
  t = jnp.zeros((batch,))
  if c.model.context_dim:
    kw = {'context': jnp.zeros((batch, c.model.context_len, c.model.context_dim))}
    if c.model.pooled_dim:
      kw['pooled'] = jnp.zeros((batch, c.model.pooled_dim))
    return (x, t, None), kw
  return (x, t, jnp.zeros((batch,), jnp.int32)), {}


def init_params_fn(c: ml_collections.ConfigDict, model):
  args, kw = model_inputs(c, 1)
  return lambda key: model.init(key, *args, **kw)['params']


def batch_spec(c: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the train step's global batch."""
  b = c.data.global_batch
  out = {'latents': jax.ShapeDtypeStruct((b, *latent_shape(c)), jnp.float32)}
  if c.model.context_dim:
    out['context'] = jax.ShapeDtypeStruct((b, c.model.context_len, c.model.context_dim), jnp.float32)
    if c.model.pooled_dim:
      out['pooled'] = jax.ShapeDtypeStruct((b, c.model.pooled_dim), jnp.float32)
  else:
    out['labels'] = jax.ShapeDtypeStruct((b,), jnp.int32)
  return out


def lower_train_step(c: ml_collections.ConfigDict, mesh: Any = None) -> Any:
  """The config's train step lowered for abstract inputs (nothing is materialised): checks that a config's shapes
  fit together, and gives XLA's cost and memory analyses after `.compile()` (benchmarks)."""
  from flax import linen as nn  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  mesh = mesh if mesh is not None else train.make_mesh(devices=jax.devices()[:1])
  ae_model = ae_lib.AutoencoderKL(autoencoder_config(c), dtype=DTYPES[c.autoencoder.dtype], remat=c.autoencoder.remat)
  model = make_model(c, ae_model.config.latent_channels)
  step_cfg = step_config(c, num_devices=mesh.size)
  optimizer = train.make_optimizer(step_cfg.optim)
  key = jax.random.key(0)
  boxed = jax.eval_shape(lambda k: train.create_state(init_params_fn(c, model)(k), optimizer, k), key)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, train.param_rules(c.mesh.shard_params))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  replicated = NamedSharding(mesh, P())
  ae_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                           jax.eval_shape(lambda k: ae_lib.init_params(ae_model, k), key))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=train.batch_sharding(mesh))
           for k, v in batch_spec(c).items()}
  step = train.jit_train_step(shardings, mesh, model=model, optimizer=optimizer, cfg=step_cfg, ae_model=ae_model)
  return step.lower(state, batch, ae_params)
