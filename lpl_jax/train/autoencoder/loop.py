"""The training loop (resumable), the diffusers-format export with its latent scale, and `ensure_autoencoder`.

Workdir layout:
  <workdir>/checkpoints/<step>/   orbax: the `AEState` and the data iterator's state (resume is exact)
  <workdir>/export/               config.json + diffusion_pytorch_model.safetensors (+ lpl_training.json)
  <workdir>/metrics.jsonl         one line per logged step
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import autoencoder as ae
from lpl_jax.data import make_image_pipeline, make_source
from lpl_jax.train import workdir as workdir_lib
from lpl_jax.train.autoencoder import step as step_lib
from lpl_jax.train.autoencoder.config import AETrainConfig
from lpl_jax.train.checkpoint import Checkpointer
from lpl_jax.train.errors import NonFiniteLossError, non_finite
from lpl_jax.train.metrics import open_history

log = logging.getLogger(__name__)

TRAINING_INFO = 'lpl_training.json'  # beside config.json: the settings, their hash, the step, the measurements
_EVAL_SEED_OFFSET = 1_000_003  # held-out crops: another crop/flip stream than any training seed near it


def _images(cfg: AETrainConfig, count: int, seed: int) -> np.ndarray:
  """`count` random crops (no flips) of the embedded photographs, `[count, R, R, 3]` in [-1, 1]."""
  batch = min(count, 64)
  it = iter(
    make_image_pipeline(
      make_source('embedded', num_samples=max(count, cfg.num_samples)),
      resolution=cfg.resolution,
      global_batch=batch,
      seed=seed,
      random_crop=True,
      num_epochs=None,
    )
  )
  return np.concatenate([next(it)['images'] for _ in range(math.ceil(count / batch))])[:count]


def _batched(fn: Callable, images: np.ndarray, batch: int = 64) -> np.ndarray:
  out = [np.asarray(fn(images[i : i + batch])) for i in range(0, len(images), batch)]
  return np.concatenate(out)


def evaluate(model: ae.AutoencoderKL, params: Any, images: np.ndarray) -> dict[str, float]:
  """PSNR (dB, reconstructions of the posterior mean clipped to [-1, 1]) and L1 on `images`."""

  @jax.jit
  def fn(x):
    x_rec = step_lib.reconstruct(model, params, x)[0]
    return jnp.stack([step_lib.psnr(x, x_rec), jnp.mean(jnp.abs(jnp.clip(x_rec, -1, 1) - x), axis=(1, 2, 3))], -1)

  values = _batched(fn, images)
  return {'psnr': float(values[:, 0].mean()), 'l1': float(values[:, 1].mean())}


def latent_scaling_factor(model: ae.AutoencoderKL, params: Any, images: np.ndarray, seed: int) -> float:
  """`1 / std(z)` over posterior samples of `images` (every element of every latent), as for SD's 0.18215."""
  key = jax.random.key(seed)

  @jax.jit
  def fn(x, k):
    mean, logvar = model.apply({'params': params}, x, method=model.encode)
    return ae.sample_posterior(k, mean, logvar)

  z = np.concatenate(
    [np.asarray(fn(images[i : i + 64], jax.random.fold_in(key, i))) for i in range(0, len(images), 64)]
  )
  return float(1.0 / z.astype(np.float64).std())


def export(
  folder: str, cfg: AETrainConfig, params: Any, *, step: int, scale_images: np.ndarray, eval_images: np.ndarray
) -> dict[str, Any]:
  """Writes the diffusers-format folder with the measured `scaling_factor`, then `lpl_training.json` (last, so its
  presence means the folder is complete)."""
  model = ae.AutoencoderKL(cfg.autoencoder_config())  # float32 for the measurements, whatever trained it
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  scale = latent_scaling_factor(model, params, scale_images, cfg.seed)
  metrics = evaluate(model, params, eval_images)
  info_path = os.path.join(folder, TRAINING_INFO)
  if os.path.exists(info_path):
    os.remove(info_path)  # the folder is being rewritten: not complete until the new info lands
  exported = ae.AutoencoderKL(dataclasses.replace(cfg.autoencoder_config(), scaling_factor=scale))
  ae.save_diffusers(folder, exported, params)
  info = dict(
    settings=cfg.to_json(),
    settings_hash=cfg.settings_hash(),
    step=step,
    scaling_factor=scale,
    heldout_psnr=metrics['psnr'],
    heldout_l1=metrics['l1'],
    heldout_images=len(eval_images),
  )
  tmp = info_path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, info_path)
  return info


def read_training_info(folder: str) -> dict[str, Any] | None:
  path = os.path.join(folder, TRAINING_INFO)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def train(
  cfg: AETrainConfig, workdir: str, *, export_dir: str | None = None, stop_after: int | None = None
) -> dict[str, Any]:
  """Trains (resuming from `workdir/checkpoints`) and exports to `export_dir` (default `workdir/export`).

  Args:
    stop_after: stop (with a checkpoint, without the final export) once this step is reached; for tests of
      interrupted runs.

  Returns:
    The export's `lpl_training.json` contents plus `train_seconds` (this call's training time), or the last metrics
    when stopped early.

  Raises:
    WorkdirError: the workdir is not a writable folder, or another trainer holds it.
    NonFiniteLossError: a logged metric was NaN or infinite; that step is not saved, the earlier checkpoints stay.
  """
  workdir_lib.prepare(workdir)
  with workdir_lib.WorkdirLock(workdir):
    return _train(cfg, workdir, export_dir or os.path.join(workdir, 'export'), stop_after)


def _train(cfg: AETrainConfig, workdir: str, export_dir: str, stop_after: int | None) -> dict[str, Any]:
  model, disc = step_lib.make_models(cfg)
  optimizer = step_lib.make_optimizer(cfg)
  state = step_lib.create_state(cfg, model, disc, optimizer)
  data = iter(
    make_image_pipeline(
      make_source('embedded', num_samples=cfg.num_samples),
      resolution=cfg.resolution,
      global_batch=cfg.batch_size,
      seed=cfg.seed,
      random_crop=True,
      random_flip=True,
    )
  )
  ckpt = Checkpointer(
    os.path.join(workdir, 'checkpoints'), save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, quarantine=True
  )
  start = 0
  restored = ckpt.restore(state)
  if restored is not None:
    state, data_state, start = restored
    data.set_state(data_state)
    log.info('resumed from step %d', start)
  open_history(workdir, start, resumed=restored is not None)
  steps = {gan: step_lib.jit_train_step(cfg, model, disc, optimizer, gan=gan) for gan in {False, bool(disc)}}
  scale_images = _images(cfg, cfg.scale_images, cfg.seed + 1)
  eval_images = _images(cfg, cfg.eval_images, cfg.seed + _EVAL_SEED_OFFSET)
  end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
  metrics: dict[str, float] = {}
  t0 = time.time()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as log_file:
    for s in range(start, end):
      gan = disc is not None and s >= cfg.disc_start
      state, out = steps[gan](state, next(data))
      done = s + 1
      if done % cfg.log_every == 0 or done == end:
        metrics = {k: float(v) for k, v in jax.device_get(out).items()}
        bad = non_finite(metrics)
        if bad:
          ckpt.close()  # waits for the pending saves: every checkpoint left is from a step before this one
          error = NonFiniteLossError(done, bad)
          error.checkpoints = f'The checkpoints in {ckpt.directory} are all from earlier steps.'
          raise error
        log_file.write(json.dumps(dict(step=done, seconds=round(time.time() - t0, 2), **metrics)) + '\n')
        log_file.flush()
        log.info('step %d/%d %s', done, cfg.steps, ' '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items())))
      ckpt.save(done, state, data.get_state(), force=done == end)
      if cfg.export_every and done % cfg.export_every == 0 and done < cfg.steps:
        export(export_dir, cfg, state.params, step=done, scale_images=scale_images, eval_images=eval_images)
  seconds = time.time() - t0
  ckpt.close()
  if end < cfg.steps:
    return dict(metrics, step=end, train_seconds=seconds)
  if start < cfg.steps or not is_complete(export_dir, cfg):
    info = export(export_dir, cfg, state.params, step=cfg.steps, scale_images=scale_images, eval_images=eval_images)
  else:
    info = read_training_info(export_dir)
  log.info(
    'exported %s: scaling_factor %.4f, held-out PSNR %.2f dB', export_dir, info['scaling_factor'], info['heldout_psnr']
  )
  return dict(info, train_seconds=seconds)


def is_complete(folder: str, cfg: AETrainConfig) -> bool:
  info = read_training_info(folder)
  return bool(info) and info.get('settings_hash') == cfg.settings_hash() and info.get('step') == cfg.steps


def ensure_autoencoder(cache_dir: str, **settings: Any) -> str:
  """A trained autoencoder's diffusers folder for `settings` (`AETrainConfig` fields), trained on first use.

  The run lives in `<cache_dir>/ae-<hash>/` (its checkpoints too, so an interrupted first use resumes); the export
  is `<cache_dir>/ae-<hash>/export/`, returned at once when its `lpl_training.json` carries the same settings hash
  and step count. Different settings get a different folder, so they train anew.
  """
  cfg = AETrainConfig(**settings)
  workdir = os.path.join(os.fspath(cache_dir), f'ae-{cfg.settings_hash()[:16]}')
  folder = os.path.join(workdir, 'export')
  if is_complete(folder, cfg):
    log.info('autoencoder cache hit: %s', folder)
    return folder
  if os.path.isdir(folder):
    shutil.rmtree(folder)  # a partial or intermediate export: the final one replaces it
  log.info('training an autoencoder into %s (%d steps)', workdir, cfg.steps)
  train(cfg, workdir)
  return folder
