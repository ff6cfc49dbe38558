"""The experiment, typed: one frozen dataclass per section of a config file, built once from the `ml_collections`
config (`Experiment.from_config_dict`), and the library objects its sections describe (the formulation, timestep
sampler, `LPLConfig` and the step's `StepConfig`); `train.validate` checks it in one place.

The entry points are the only code that reads a `ConfigDict`; everything below them takes an `Experiment`. Every
field is declared, with its value, in `configs/common.py` (`base()`), which the config files start from;
docs/configs.md describes each one. A section's values that the library's own constructors check (`OptimConfig`,
`LPLConfig`, `StepConfig`, `TimestepSampler`, formulations) are checked by building those objects here, with the
error named by its config section (`from_section`), not a second time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from lpl_jax import autoencoder as ae_lib
from lpl_jax import diffusion
from lpl_jax import lpl as lpl_lib
from lpl_jax.train.errors import ConfigError
from lpl_jax.train.state import OptimConfig
from lpl_jax.train.step import StepConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODEL_KINDS = ('dit', 'mmdit')
DATA_KINDS = ('embedded', 'folder', 'tfds', 'cache')


@dataclasses.dataclass(frozen=True)
class DataSection:
  """Where batches come from: `source` is `'embedded'`, `'folder:PATH'`, `'tfds:NAME'` or `'cache:PATH'`.

  `''` and `0` mean "none" (`data_dir`, `num_samples`) so that every field can be set from the command line.
  """

  source: str
  split: str
  data_dir: str
  resolution: int
  global_batch: int
  shuffle: bool
  random_flip: bool
  random_crop: bool
  num_samples: int
  worker_count: int
  prefetch: int
  latent_sampling: str  # latents with a stored std: 'sample' z ~ posterior, or 'mean'

  @property
  def kind(self) -> str:
    return self.source.split(':', 1)[0]

  @property
  def location(self) -> str:
    """The path or name after `kind:` (empty for the embedded photographs)."""
    return self.source.partition(':')[2]


@dataclasses.dataclass(frozen=True)
class AutoencoderSection:
  """The frozen autoencoder: a diffusers-format folder (`weights`), or the `preset` architecture with random weights
  when `allow_random_weights` (tests and smoke runs only)."""

  preset: str
  weights: str
  dtype: str
  allow_random_weights: bool


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """The denoiser. `context_dim > 0` makes an MMDiT text-conditional (cached text embeddings)."""

  kind: str
  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float
  num_classes: int
  context_dim: int
  context_len: int
  pooled_dim: int
  qk_norm: bool
  modulation: str  # 'block' or 'single' (adaLN-single); lpl_jax.models.layers
  learn_sigma: bool  # DiT: 2C output channels, the prediction then the variance interpolation
  pos_embed_max_size: int  # MMDiT: SD3's cropped positions (0: none)
  pos_embed_base_size: int  # their grid's training side (0: pos_embed_max_size)
  dtype: str
  remat: bool
  remat_policy: str  # what a rematerialised block keeps (lpl_jax.models.layers.REMAT_POLICIES)
  scan_layers: bool  # the blocks as one nn.scan over stacked params

  @property
  def text(self) -> bool:
    return self.context_dim > 0


@dataclasses.dataclass(frozen=True)
class DiffusionSection:
  formulation: str
  schedule: str
  beta_start: float
  beta_end: float
  zero_terminal_snr: bool
  timesteps: str
  logit_mean: float
  logit_std: float
  mode_scale: float
  shift: float
  vb_weight: float  # the variational bound term's weight when the model learns its variance


@dataclasses.dataclass(frozen=True)
class LPLSection:
  """LPL in the train step: the loss preset and the fields a config overrides, and how the step runs it.

  The preset carries its weight, gate (and threshold) and averaging into the step: `weight`, `tau` and `t_threshold`
  at -1, and `gate` and `normalize` at '', mean "the preset's" (`lpl_config`, `lpl_normalize`); any other value
  overrides it. `groups` is the number of stratification groups of the global batch (0 = one per device and
  accumulation step); `chunk` the rows per chunk of the LPL branch (0 = all of a device's rows at once)."""

  enabled: bool
  preset: str
  weight: float
  gate: str
  tau: float
  t_threshold: int
  start_step: int
  chunk: int
  normalize: str
  norm_axis: str
  stats_gradient: bool
  groups: int
  remat: bool
  remat_policy: str  # of the decoder branch (the names of model.remat_policy)
  num_blocks: int


@dataclasses.dataclass(frozen=True)
class StepSection:
  """`loss_weighting`: `'none'`, `'min_snr'` (with `min_snr_gamma`) or `'lpl_variance'` (Eq. 15, needs `lpl.enabled`;
  the LPL branch then only measures, `StepConfig`); `stats_decay`: decay of the running loss variances;
  `stratify_timesteps`: without LPL, draw the timesteps stratified by the `lpl` section's gate all the same, as an
  LPL run of the same config does (`python -m lpl_jax.compare` sets it for every variant: paired runs then see the
  same timesteps; the marginal distribution is unchanged)."""

  label_dropout: float
  accum_steps: int
  loss_weighting: str
  min_snr_gamma: float
  stats_decay: float
  stratify_timesteps: bool


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int  # -1: the devices that fsdp leaves
  fsdp: int
  shard_params: bool


@dataclasses.dataclass(frozen=True)
class InitSection:
  """Post-training: the pre-training run to start from (params and EMA, and the optimizer state if asked)."""

  checkpoint: str
  step: int  # -1: its latest checkpoint
  keep_optimizer: bool
  required: bool  # post-training configs: starting without init.checkpoint is an error


@dataclasses.dataclass(frozen=True)
class SampleSection:
  """The sampler of the run's sample grids and of `python -m lpl_jax.sample`; `spacing` is the DDPM samplers'
  timestep grid (`'trailing'` for zero-terminal SNR)."""

  sampler: str
  steps: int
  guidance: float
  eta: float
  use_ema: bool
  spacing: str


@dataclasses.dataclass(frozen=True)
class GuardSection:
  """The divergence guard: stop, without saving the step, when `loss/diffusion` exceeds `loss_spike` x its running
  median over the previous `window` steps, or `grad_norm` exceeds `max_grad_norm` (0 turns each off)."""

  loss_spike: float
  window: int
  max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class EvalSection:
  """Evaluation in the loop: every `every` steps (0: off) and at the end, `num_images` samples of the EMA params
  against the statistics file `reference`, with the `features` extractor (`'inception'`: FID with the weights file
  `inception_weights`; `'small_domain'`: the embedded photographs' extractor). `batch_size` images per sampling call
  (0: data.global_batch); `keep_best` keeps the best evaluation's EMA params as `checkpoints/best`."""

  every: int
  num_images: int
  reference: str
  features: str
  inception_weights: str
  batch_size: int
  keep_best: bool


@dataclasses.dataclass(frozen=True)
class ProfileSection:
  """A `jax.profiler` trace of the steps `[start_step, start_step + num_steps)` in `<workdir>/profile`, written by
  process 0 (every process with `all_processes`); `num_steps = 0` is off."""

  start_step: int
  num_steps: int
  all_processes: bool


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A whole run. The top-level fields are the loop's; the sections are the pieces it builds."""

  seed: int
  total_steps: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  sample_every: int  # 0: sample grids only at the end
  num_sample_images: int
  progress: bool
  data: DataSection
  autoencoder: AutoencoderSection
  model: ModelSection
  diffusion: DiffusionSection
  optim: OptimConfig
  lpl: LPLSection
  step: StepSection
  mesh: MeshSection
  init: InitSection
  sample: SampleSection
  guard: GuardSection
  eval: EvalSection
  profile: ProfileSection

  @classmethod
  def from_config_dict(cls, config: Any) -> Experiment:
    """From a `ConfigDict` (or a nested mapping, e.g. a run's `config.json`): every field present, none unknown.

    Raises:
      ConfigError: naming every missing and unknown field, or a section given as a value.
    """
    tree = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    return _build(cls, tree, '')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  def replace(self, **sections: Any) -> Experiment:
    """A copy with fields replaced; a mapping for a section replaces only the fields it names:
    `exp.replace(total_steps=10, lpl={'enabled': True})`."""
    out = {}
    for name, value in sections.items():
      current = getattr(self, name)
      out[name] = dataclasses.replace(current, **value) if isinstance(value, Mapping) else value
    return dataclasses.replace(self, **out)


def _layout_problems(cls: type, tree: Mapping[str, Any], prefix: str) -> tuple[list[str], list[str]]:
  """`(missing, unknown)` field names of the whole tree, dotted."""
  fields, hints = {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
  missing = [prefix + k for k in sorted(fields - set(tree))]
  unknown = [prefix + k for k in sorted(set(tree) - fields)]
  for name in sorted(fields & set(tree)):
    if dataclasses.is_dataclass(hints[name]) and isinstance(tree[name], Mapping):
      m, u = _layout_problems(hints[name], tree[name], f'{prefix}{name}.')
      missing, unknown = missing + m, unknown + u
  return missing, unknown


def _build(cls: type, tree: Mapping[str, Any], prefix: str) -> Any:
  if not prefix:
    missing, unknown = _layout_problems(cls, tree, '')
    if missing or unknown:
      parts = ([f'missing {", ".join(missing)}'] if missing else []) + (
        [f'unknown {", ".join(unknown)}'] if unknown else []
      )
      raise ConfigError(
        f'the config does not match the experiment layout: {"; ".join(parts)}. Every field is '
        'declared in configs/common.py (docs/configs.md).'
      )
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    hint, value = hints[f.name], tree[f.name]
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, Mapping):
        raise ConfigError(f'{prefix}{f.name} is a section; got the value {value!r}.')
      if hint is OptimConfig:  # the library's dataclass, which checks its own values
        kwargs[f.name] = from_section(
          prefix + f.name,
          lambda h=hint, v=value, p=f'{prefix}{f.name}.': h(
            **{k: _coerce(x, typing.get_type_hints(h)[k], p + k) for k, x in v.items()}
          ),
        )
      else:
        kwargs[f.name] = _build(hint, value, f'{prefix}{f.name}.')
    else:
      kwargs[f.name] = _coerce(value, hint, prefix + f.name)
  return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
  """Config values keep their declared type (ints given for floats are widened; anything else is an error)."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is not None:
    return value
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
    raise ConfigError(f'{name}={value!r}; expected {hint.__name__}.')
  return value


# --- the library objects a section describes ------------------------------------------------------------------


def check(cond: bool, msg: str) -> None:
  """Raises a ConfigError with `msg` unless `cond`."""
  if not cond:
    raise ConfigError(msg)


def from_section(section: str, make: Callable[[], Any]) -> Any:
  """A library object from a section's values; its own ValueError becomes a ConfigError naming the section."""
  try:
    return make()
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f'{section}: {e}') from e


def autoencoder_config(section: AutoencoderSection) -> ae_lib.AutoencoderConfig:
  """The autoencoder's architecture: read from the weights folder, else the preset's."""
  if section.weights and os.path.isdir(section.weights):
    return ae_lib.read_config(section.weights)
  check(section.preset in ae_lib.PRESETS, f'autoencoder.preset={section.preset!r}; known: {sorted(ae_lib.PRESETS)}.')
  return ae_lib.PRESETS[section.preset]


def formulation(section: DiffusionSection, *, learn_sigma: bool = False) -> diffusion.Formulation:
  """The formulation of `section`; `learn_sigma` (the model section's) adds the variance channels and the
  hybrid loss."""
  return from_section(
    'diffusion',
    lambda: diffusion.get_formulation(
      section.formulation,
      schedule=section.schedule,
      beta_start=section.beta_start,
      beta_end=section.beta_end,
      zero_terminal_snr=section.zero_terminal_snr,
      learn_sigma=learn_sigma,
      vb_weight=section.vb_weight,
    ),
  )


def timestep_sampler(section: DiffusionSection, form: diffusion.Formulation) -> diffusion.TimestepSampler:
  return from_section(
    'diffusion',
    lambda: diffusion.TimestepSampler(
      kind=section.timesteps,
      num_timesteps=None if form.is_flow else form.num_timesteps,
      logit_mean=section.logit_mean,
      logit_std=section.logit_std,
      mode_scale=section.mode_scale,
      shift=section.shift,
    ),
  )


# How each preset averages the LPL term over a batch (`StepConfig.lpl_normalize`). The paper's Eq. 3 is an
# expectation over all samples, the term 0 where the gate is off: the sum over the LPL rows divided by the batch.
# The reference's training loop takes the mean over the rows its gate lets through (`lpl_loss.mean()` over
# `timesteps < lpl_t_threshold`): the sum divided by the LPL rows. The two differ by the fraction of gated rows.
PRESET_NORMALIZE = {'paper': 'batch', 'reference': 'rows'}


def lpl_config(section: LPLSection, *, enabled: bool | None = None) -> lpl_lib.LPLConfig | None:
  """The loss config: the preset, with the fields the section sets (see `LPLSection`); None when LPL is off
  (`enabled` overrides `section.enabled`: the gate of a paired baseline is the one LPL would use)."""
  if not (section.enabled if enabled is None else enabled):
    return None
  overrides = dict(
    remat=section.remat,
    remat_policy=section.remat_policy,
    num_blocks=section.num_blocks,
    norm_axis=section.norm_axis,
    stats_gradient=section.stats_gradient,
  )
  for name, unset in (('weight', -1), ('gate', ''), ('tau', -1), ('t_threshold', -1)):
    if getattr(section, name) != unset:
      overrides[name] = getattr(section, name)
  return from_section('lpl', lambda: lpl_lib.LPLConfig.from_preset(section.preset, **overrides))


def lpl_normalize(section: LPLSection) -> str:
  """How the step averages the LPL term: `lpl.normalize`, else the preset's (`PRESET_NORMALIZE`)."""
  return section.normalize or PRESET_NORMALIZE.get(section.preset, 'batch')


def lpl_groups(exp: Experiment, num_devices: int) -> int:
  """Stratification groups of the global batch: `lpl.groups`, or one per device and accumulation step."""
  return exp.lpl.groups or num_devices * exp.step.accum_steps


def step_config(exp: Experiment, *, num_devices: int | None = None) -> StepConfig:
  """The train step's static config. The LPL rows per group come from the timestep distribution's mass below the
  noise-level threshold of the preset's gate at the data's resolution (`lpl.noise_level_threshold`,
  `TimestepSampler.split`)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  form = formulation(exp.diffusion, learn_sigma=exp.model.learn_sigma)
  sampler = timestep_sampler(exp.diffusion, form)
  loss = lpl_config(exp.lpl)
  gate = loss if loss is not None else (lpl_config(exp.lpl, enabled=True) if exp.step.stratify_timesteps else None)
  groups = rows = 0
  if gate is not None:
    groups = lpl_groups(exp, num_devices)
    rows = sampler.split(
      form, lpl_lib.noise_level_threshold(gate, exp.data.resolution, form), exp.data.global_batch // groups
    )
  return from_section(
    'lpl',
    lambda: StepConfig(
      form,
      sampler,
      exp.optim,
      lpl=loss,
      lpl_rows_per_group=rows,
      lpl_groups=groups,
      lpl_start_step=exp.lpl.start_step,
      lpl_chunk=exp.lpl.chunk,
      lpl_normalize=lpl_normalize(exp.lpl),
      label_dropout=exp.step.label_dropout,
      null_class=exp.model.num_classes,
      loss_weighting=exp.step.loss_weighting,
      min_snr_gamma=exp.step.min_snr_gamma,
      stats_decay=exp.step.stats_decay,
      accum_steps=exp.step.accum_steps,
    ),
  )


def latent_shape(exp: Experiment) -> tuple[int, int, int]:
  """`(h, w, c)` of the denoiser's latents."""
  ae_cfg = autoencoder_config(exp.autoencoder)
  side = exp.data.resolution // ae_cfg.downsample_factor
  return side, side, ae_cfg.latent_channels


# Fields added after runs were first written, with the value that reproduces what such a run did: `load_run` fills
# them in a `config.json` that lacks them, so sampling and evaluating an older run keep working.
ADDED_FIELDS = {
  'model.modulation': 'block',
  'model.learn_sigma': False,
  'model.pos_embed_max_size': 0,
  'model.pos_embed_base_size': 0,
  'model.remat_policy': 'full',
  'model.scan_layers': False,
  'lpl.remat_policy': 'full',
  'eval': {
    'every': 0,
    'num_images': 1000,
    'reference': '',
    'features': 'inception',
    'inception_weights': '',
    'batch_size': 0,
    'keep_best': True,
  },
  'profile': {'start_step': 0, 'num_steps': 0, 'all_processes': False},
  'diffusion.vb_weight': 1.0,
  'lpl.norm_axis': 'space',
  'lpl.stats_gradient': True,  # the statistics used to be differentiated
  'step.loss_weighting': 'none',
  'step.min_snr_gamma': 5.0,
  'step.stats_decay': 0.99,
  'step.stratify_timesteps': False,
  'optim.ema_start_step': 0,
  'sample.spacing': 'leading',
  'guard': {'loss_spike': 0.0, 'window': 100, 'max_grad_norm': 0.0},
}


def load_run(workdir: str) -> Experiment:
  """The experiment a training run (a local or remote workdir) was started with (its `config.json`); fields added
  since the run was written take the values it ran with (`ADDED_FIELDS`)."""
  path = epath.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: the workdir must be a training run of lpl_jax.main.')
  tree = json.loads(path.read_text())
  for dotted, value in ADDED_FIELDS.items():
    *sections, name = dotted.split('.')
    node = tree
    for section in sections:
      node = node.get(section) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.setdefault(name, copy.deepcopy(value))
  return Experiment.from_config_dict(tree)
