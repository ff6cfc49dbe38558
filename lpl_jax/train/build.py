"""The objects an `Experiment` describes: the frozen autoencoder, the denoiser, its inputs, the step lowered on
abstract shapes, the sampler, and the state of a run's checkpoint with samples from it.

Everything here takes the typed `Experiment` (`train.config`), never a `ConfigDict`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpl_jax import autoencoder as ae_lib
from lpl_jax import diffusion
from lpl_jax import models as models_lib
from lpl_jax.models import dit as dit_lib
from lpl_jax.models import scan as scan_lib
from lpl_jax.models.dit import DiT
from lpl_jax.models.mmdit import MMDiT
from lpl_jax.train import perf, sharding
from lpl_jax.train.checkpoint import Checkpointer
from lpl_jax.train.config import DTYPES, Experiment, autoencoder_config, formulation, latent_shape, step_config
from lpl_jax.train.errors import ConfigError
from lpl_jax.train.state import make_optimizer

log = logging.getLogger(__name__)


def load_autoencoder(exp: Experiment) -> tuple[ae_lib.AutoencoderKL, Any]:
  """The frozen autoencoder and its host params: from `autoencoder.weights`, or random (from `seed`) for the preset
  when the config allows it."""
  section = exp.autoencoder
  model, params, random = ae_lib.load_autoencoder(
    section.weights or section.preset, dtype=DTYPES[section.dtype], seed=exp.seed + 1
  )
  if random:
    log.warning('autoencoder: RANDOM weights (preset %s); LPL and samples are meaningless.', section.preset)
  return model, params


def make_denoiser(exp: Experiment, latent_channels: int) -> DiT | MMDiT:
  m = exp.model
  kw = dict(
    patch_size=m.patch_size,
    hidden_size=m.hidden_size,
    depth=m.depth,
    num_heads=m.num_heads,
    mlp_ratio=m.mlp_ratio,
    in_channels=latent_channels,
    dtype=DTYPES[m.dtype],
    remat=m.remat,
    modulation=m.modulation,
    remat_policy=m.remat_policy,
    scan_layers=m.scan_layers,
  )
  if m.kind == 'dit':
    return DiT(num_classes=m.num_classes, learn_sigma=m.learn_sigma, **kw)
  if m.pos_embed_max_size:
    kw['pos_embed_max_size'] = m.pos_embed_max_size
    kw['pos_embed_base_size'] = m.pos_embed_base_size or None
  return MMDiT(
    num_classes=m.num_classes,
    context_dim=m.context_dim or None,
    pooled_dim=m.pooled_dim or None,
    qk_norm=m.qk_norm,
    **kw,
  )


def denoiser_inputs(exp: Experiment, batch: int) -> tuple[tuple, dict]:
  """Zero inputs of the denoiser for `batch` rows (for `init` and abstract shapes): `(args, kwargs)`."""
  x = jnp.zeros((batch, *latent_shape(exp)))
  t = jnp.zeros((batch,))
  m = exp.model
  if m.text:
    kw = {'context': jnp.zeros((batch, m.context_len, m.context_dim))}
    if m.pooled_dim:
      kw['pooled'] = jnp.zeros((batch, m.pooled_dim))
    return (x, t, None), kw
  return (x, t, jnp.zeros((batch,), jnp.int32)), {}


def init_params_fn(exp: Experiment, model: Any) -> Callable[[jax.Array], Any]:
  """`key -> params` of the denoiser, boxed with their logical axis names."""
  args, kw = denoiser_inputs(exp, 1)
  return lambda key: model.init(key, *args, **kw)['params']


def batch_spec(exp: Experiment) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the train step's global batch."""
  b, m = exp.data.global_batch, exp.model
  out = {'latents': jax.ShapeDtypeStruct((b, *latent_shape(exp)), jnp.float32)}
  if m.text:
    out['context'] = jax.ShapeDtypeStruct((b, m.context_len, m.context_dim), jnp.float32)
    if m.pooled_dim:
      out['pooled'] = jax.ShapeDtypeStruct((b, m.pooled_dim), jnp.float32)
  else:
    out['labels'] = jax.ShapeDtypeStruct((b,), jnp.int32)
  return out


@dataclasses.dataclass(frozen=True)
class AbstractStep:
  """The train step's inputs as `jax.ShapeDtypeStruct`s with their shardings (nothing allocated), and the state's
  shardings: what the trainer compiles ahead, a checkpoint restores into, and the benchmarks lower."""

  state: Any
  state_shardings: Any
  batch: dict[str, jax.ShapeDtypeStruct]
  ae_params: Any


def abstract_step(
  exp: Experiment,
  model: Any,
  ae_model: ae_lib.AutoencoderKL | None,
  optimizer: Any,
  mesh: Mesh,
  *,
  ae_params: Any = None,
) -> AbstractStep:
  """The one builder of the abstract sharded train state (and the step's other inputs) for an experiment: the
  trainer compiles ahead on it, a checkpoint restores into its state (the sampler's `restore_state`), and the config
  lowering and the benchmarks lower on it.

  Args:
    ae_model: the frozen autoencoder; None when only the state is wanted (its params are then None).
    ae_params: the autoencoder params the step will get (their tree and dtypes are used), or None for those of
      `ae_model`'s initialiser.
  """
  state, shardings = sharding.abstract_state(init_params_fn(exp, model), optimizer, mesh, fsdp=exp.mesh.shard_params)
  replicated = NamedSharding(mesh, P())
  if ae_params is None and ae_model is not None:
    ae_params = jax.eval_shape(lambda k: ae_lib.init_params(ae_model, k), jax.random.key(0))
  ae_abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x), sharding=replicated), ae_params
  )
  rows = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in batch_spec(exp).items()}
  return AbstractStep(state, shardings, batch, ae_abstract)


def trace_step(exp: Experiment, step_fn: Any, inputs: AbstractStep, mesh: Mesh) -> tuple[Any, Any]:
  """`(traced, lowered)`: `step_fn` (from `sharding.jit_train_step`) traced on `inputs` with the logical axis rules
  in force, and lowered."""
  with sharding.tracing_context(mesh, fsdp=exp.mesh.shard_params):
    traced = step_fn.trace(inputs.state, inputs.batch, inputs.ae_params)
    return traced, traced.lower()


def compile_step(
  exp: Experiment, step_fn: Any, inputs: AbstractStep, mesh: Mesh, *, memory_limit: int | None = None
) -> tuple[Any, perf.CompiledCost]:
  """The step compiled ahead, on abstract inputs, and its cost; stops when it needs more memory than a device holds.

  Args:
    memory_limit: bytes per device; None: what the backend reports (nothing on CPUs, where nothing is checked).

  Raises:
    ConfigError: the compiled step's peak memory per device exceeds the limit, with the fields that size it.
  """
  start = time.perf_counter()
  traced, lowered = trace_step(exp, step_fn, inputs, mesh)
  compiled = lowered.compile()
  cost = perf.compiled_cost(compiled, time.perf_counter() - start, flops=perf.jaxpr_flops(traced.jaxpr, mesh.size))
  limit = memory_limit if memory_limit is not None else perf.device_memory_limit(mesh.local_devices[0])
  if limit is not None and cost.peak_bytes > limit:
    m, d = exp.model, exp.data
    raise ConfigError(
      f'the train step needs {cost.peak_bytes / perf.GIB:.2f} GiB per device (arguments '
      f'{cost.argument_bytes / perf.GIB:.2f}, temporaries {cost.temp_bytes / perf.GIB:.2f}) and a device holds '
      f'{limit / perf.GIB:.2f} GiB: data.global_batch={d.global_batch} over {mesh.size} devices, '
      f'data.resolution={d.resolution}, model.kind={m.kind!r} with {m.depth} blocks of {m.hidden_size}, '
      f'lpl.enabled={exp.lpl.enabled}. Lower data.global_batch (step.accum_steps keeps the batch), set '
      'model.remat=True, shard the params (mesh.fsdp, mesh.shard_params=True) or set lpl.chunk.'
    )
  return compiled, cost


def lower_train_step(exp: Experiment, mesh: Mesh | None = None) -> Any:
  """The experiment's train step lowered for abstract inputs (nothing is materialised): checks that a config's
  shapes fit together, and gives XLA's cost and memory analyses after `.compile()` (benchmarks)."""
  mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
  ae_model = ae_lib.AutoencoderKL(autoencoder_config(exp.autoencoder), dtype=DTYPES[exp.autoencoder.dtype])
  model = make_denoiser(exp, ae_model.config.latent_channels)
  cfg = step_config(exp, num_devices=mesh.size)
  optimizer = make_optimizer(cfg.optim)
  inputs = abstract_step(exp, model, ae_model, optimizer, mesh)
  step = sharding.jit_train_step(
    inputs.state_shardings, mesh, model=model, optimizer=optimizer, cfg=cfg, ae_model=ae_model
  )
  return trace_step(exp, step, inputs, mesh)[1]


PYTORCH_CHECKPOINTS = ('.pt', '.pth')
_NOT_ARCHITECTURE = frozenset({'parent', 'name', 'dtype', 'param_dtype', 'remat', 'remat_policy', 'scan_layers'})


def is_pretrained(path: str) -> bool:
  """Whether `init.checkpoint` names imported weights (a diffusers model folder, whose `config.json` has a
  `_class_name`, or an original DiT `.pt`/`.pth` state dict) rather than a run of ours."""
  if path.endswith(PYTORCH_CHECKPOINTS):
    return True
  config = epath.Path(path) / 'config.json'
  try:
    return config.is_file() and '_class_name' in json.loads(config.read_text())
  except (OSError, ValueError):
    return False


def import_denoiser(model: DiT | MMDiT, path: str) -> dict:
  """Host params for `model` (the config's denoiser, in its layout: `model.scan_layers` stacks the blocks) from
  pretrained weights: a diffusers folder (`DiT` or SD3's `MMDiT`) or an original DiT checkpoint. Raises a `ValueError`
  naming each architecture field in which the weights differ from the config, with the config key to set."""
  if path.endswith(PYTORCH_CHECKPOINTS):
    # strict against `model`'s shapes; the importers give the unscanned layout (lpl_jax.models.scan)
    return scan_lib.to_layout(model, dit_lib.from_pytorch_checkpoint(path, model=model.clone(scan_layers=False))[1])
  imported, params = models_lib.from_diffusers(path)
  if type(imported) is not type(model):
    raise ValueError(
      f'{path} holds a {type(imported).__name__}; the config builds a {type(model).__name__} '
      f'(model.kind={"dit" if isinstance(imported, DiT) else "mmdit"!r}).'
    )
  unused = {'num_classes', 'num_class_tokens'} if getattr(model, 'context_dim', None) else set()
  fields = [f.name for f in dataclasses.fields(model) if f.name not in _NOT_ARCHITECTURE | unused]
  differ = [
    f'{"the autoencoder latent channels" if f == "in_channels" else "model." + f} = {getattr(model, f)!r}, '
    f'the weights {getattr(imported, f)!r}'
    for f in fields
    if getattr(model, f) != getattr(imported, f)
  ]
  if differ:
    raise ValueError(f'{path}: the weights are not the configured {type(model).__name__}: ' + '; '.join(differ) + '.')
  return scan_lib.to_layout(model, params)


def place_like(host: Any, like: Any) -> Any:
  """Host arrays -> arrays with the shapes, dtypes and shardings of `like` (the same tree), each process
  contributing its own shards."""
  return jax.tree.map(
    lambda h, ref: jax.make_array_from_callback(ref.shape, ref.sharding, lambda idx: np.asarray(h, ref.dtype)[idx]),
    host,
    like,
  )


def checkpoint_folder(workdir: str) -> str:
  """A run's checkpoint folder: `<workdir>/checkpoints`, or `workdir` itself when it is one."""
  inner = os.path.join(workdir, 'checkpoints')
  return inner if epath.Path(inner).is_dir() else workdir


def restore_state(exp: Experiment, folder: str, model: Any, mesh: Mesh, *, step: int = -1) -> tuple[Any, int]:
  """`(train state, step)` of checkpoint `step` (-1: the latest) in `folder`, restored straight into its sharded
  layout on `mesh`."""
  target = abstract_step(exp, model, None, make_optimizer(exp.optim), mesh).state
  with Checkpointer(folder, save_every=1, async_save=False) as ckpt:
    restored = ckpt.restore(target, step=None if step < 0 else step)
  if restored is None:
    raise FileNotFoundError(f'{folder} holds no checkpoint.')
  state, _, step = restored
  return state, step


def sample_conditions(exp: Experiment, source: Any, num: int) -> dict[str, np.ndarray]:
  """What `num` samples are conditioned on: classes 0, 1, 2, ... or the text embeddings of the source's first
  records."""
  if exp.model.text:
    return {'context': np.stack([source[i % len(source)]['text'] for i in range(num)]).astype(np.float32)}
  return {'labels': (np.arange(num) % exp.model.num_classes).astype(np.int32)}


def make_generate_fn(exp: Experiment, model: Any, ae_model: ae_lib.AutoencoderKL, mesh: Mesh) -> diffusion.GenerateFn:
  """The experiment's sampler (its `sample` section) followed by the decoder, rows sharded over the mesh."""
  s = exp.sample
  settings = diffusion.SamplerSettings(
    sampler=s.sampler, steps=s.steps, guidance=s.guidance, eta=s.eta, shift=exp.diffusion.shift, spacing=s.spacing
  )
  return diffusion.make_generate_fn(
    model,
    ae_model,
    formulation(exp.diffusion, learn_sigma=exp.model.learn_sigma),
    latent_shape=latent_shape(exp),
    settings=settings,
    null_class=exp.model.num_classes,
    sharding=sharding.batch_sharding(mesh),
  )


def samples_from_run(
  exp: Experiment,
  workdir: str,
  *,
  num: int,
  batch_size: int,
  seed: int = 0,
  labels: str = 'cycle',
  step: int = -1,
  ema: bool = True,
  progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, int]:
  """`(uint8 images [num, H, W, 3], class labels [num] or None for text models, checkpoint step)` sampled from a
  run's checkpoint with the experiment's sampler, batches sharded over all devices; every process gets them all.

  Args:
    labels: `'cycle'` (0, 1, 2, ...) or `'random'` (uniform from `seed`) class labels.
    step: the checkpoint (-1: the latest).
    ema: the EMA params, else the raw ones.
  """
  mesh = sharding.make_mesh(exp.mesh.data, exp.mesh.fsdp)
  if batch_size % mesh.size:
    raise ValueError(f'batch_size={batch_size} must be a multiple of the {mesh.size} devices.')
  ae_model, ae_host = load_autoencoder(exp)
  model = make_denoiser(exp, ae_model.config.latent_channels)
  state, step = restore_state(exp, checkpoint_folder(workdir), model, mesh, step=step)
  params = state.ema_params if ema else state.params
  if exp.model.text:
    from lpl_jax.data import make_source

    cond, ys = sample_conditions(exp, make_source(exp.data.source), num), None
  elif labels == 'cycle':
    cond = sample_conditions(exp, None, num)
    ys = cond['labels']
  else:
    ys = np.random.default_rng(seed).integers(0, exp.model.num_classes, num).astype(np.int32)
    cond = {'labels': ys}
  rows = sharding.batch_sharding(mesh)
  images = diffusion.generate(
    make_generate_fn(exp, model, ae_model, mesh),
    params,
    sharding.replicate(ae_host, mesh),
    cond,
    batch_size=batch_size,
    seed=seed,
    place=lambda x: jax.device_put(x, rows),
    gather=sharding.to_host,
    progress=progress,
  )
  return images, ys, step
