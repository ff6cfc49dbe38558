"""Training runs of a small autoencoder (slow tests: each run compiles the step): loss goes down, exact resume,
the export (from_diffusers and diffusers' PyTorch AutoencoderKL), the latent scale, the `ensure_autoencoder` cache."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpl_jax import autoencoder as ae
from lpl_jax.train.autoencoder import AETrainConfig, ensure_autoencoder, read_training_info, train
from lpl_jax.train.autoencoder import loop as loop_lib
from lpl_jax.train.autoencoder import step as step_lib
from lpl_jax.train.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Two levels of 8 and 16 channels at 16 px: every code path of the trainer, compiled in seconds.
SMALL = dict(
  widths=(8, 16),
  layers_per_block=1,
  resolution=16,
  batch_size=4,
  lr=3e-3,
  warmup_steps=0,
  scale_images=32,
  eval_images=8,
  log_every=1,
  checkpoint_every=4,
)


def _restored_params(workdir, cfg):
  model, disc = step_lib.make_models(cfg)
  target = step_lib.create_state(cfg, model, disc, step_lib.make_optimizer(cfg))
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1)
  state, _, step = ckpt.restore(target)
  ckpt.close()
  return state, step


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One small run through `ensure_autoencoder` (with a GAN and the structure loss from step 6)."""
  cache = str(tmp_path_factory.mktemp('ae_cache'))
  settings = dict(SMALL, steps=12, perceptual_weight=0.1, disc_weight=0.5, disc_start=6, disc_width=8, disc_layers=1)
  folder = ensure_autoencoder(cache, **settings)
  return cache, settings, folder


def test_training_decreases_the_reconstruction_loss(trained):
  _, _, folder = trained
  lines = [json.loads(s) for s in open(os.path.join(os.path.dirname(folder), 'metrics.jsonl'))]
  assert [r['step'] for r in lines] == list(range(1, 13))
  l1 = np.array([r['l1'] for r in lines])
  assert l1[-3:].mean() < 0.8 * l1[:3].mean(), l1
  gan = [r for r in lines if 'd_loss' in r]
  assert [r['step'] for r in gan] == list(range(7, 13))  # GAN terms from disc_start=6 (0-based step 6)
  assert all(np.isfinite([r['d_weight'] for r in gan])) and all(r['d_weight'] >= 0 for r in gan)


def test_export_loads_and_reproduces_the_trained_model(trained):
  _, settings, folder = trained
  cfg = AETrainConfig(**settings)
  state, step = _restored_params(os.path.dirname(folder), cfg)
  assert step == cfg.steps
  model, params = ae.from_diffusers(folder)
  info = read_training_info(folder)
  assert info['settings_hash'] == cfg.settings_hash() and info['step'] == cfg.steps
  assert model.config.scaling_factor == pytest.approx(info['scaling_factor'], rel=1e-12)
  assert model.config.block_out_channels == (8, 16) and model.config.downsample_factor == 2
  trained_model = ae.AutoencoderKL(model.config)
  x = jnp.asarray(loop_lib._images(cfg, 4, seed=123))
  fn = jax.jit(lambda m, p, x: m.apply({'params': p}, x), static_argnums=0)
  np.testing.assert_array_equal(fn(model, params, x), fn(trained_model, state.params, x))


def test_scaling_factor_is_one_over_the_latent_std(trained):
  _, settings, folder = trained
  cfg = AETrainConfig(**settings)
  model, params = ae.from_diffusers(folder)
  images = loop_lib._images(cfg, cfg.scale_images, cfg.seed + 1)
  mean, logvar = model.apply({'params': params}, jnp.asarray(images), method=model.encode)
  # Not the same noise draw as the export's, so only statistically equal: the std of N(mean, var) samples.
  std = np.sqrt(np.mean(np.square(mean) + np.exp(logvar)) - np.mean(mean) ** 2)
  assert model.config.scaling_factor == pytest.approx(1.0 / std, rel=0.05)


def test_export_loads_in_diffusers_pytorch(trained):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  _, settings, folder = trained
  model, params = ae.from_diffusers(folder)
  vae = diffusers.AutoencoderKL.from_pretrained(folder).eval()
  assert vae.config.scaling_factor == pytest.approx(model.config.scaling_factor)
  x = loop_lib._images(AETrainConfig(**settings), 4, seed=7)
  with torch.no_grad():
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    mean_t = vae.encode(xt).latent_dist.mean
    rec_t = vae.decode(mean_t).sample.numpy().transpose(0, 2, 3, 1)
  mean, _ = model.apply({'params': params}, jnp.asarray(x), method=model.encode)
  np.testing.assert_allclose(mean, mean_t.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(model.apply({'params': params}, jnp.asarray(x)), rec_t, atol=1e-4)


def test_ensure_autoencoder_reuses_the_cache(trained, monkeypatch):
  cache, settings, folder = trained
  monkeypatch.setattr(loop_lib, 'train', lambda *a, **k: pytest.fail('retrained a cached autoencoder'))
  assert ensure_autoencoder(cache, **settings) == folder
  # Bookkeeping settings do not change the weights: still a hit.
  assert ensure_autoencoder(cache, **dict(settings, log_every=5, checkpoint_every=50)) == folder


def test_ensure_autoencoder_retrains_when_settings_change(trained, monkeypatch):
  cache, settings, folder = trained
  calls = []

  def fake_train(cfg, workdir, **kwargs):
    calls.append(cfg)
    os.makedirs(os.path.join(workdir, 'export'), exist_ok=True)
    with open(os.path.join(workdir, 'export', loop_lib.TRAINING_INFO), 'w') as f:
      json.dump(dict(settings_hash=cfg.settings_hash(), step=cfg.steps), f)

  monkeypatch.setattr(loop_lib, 'train', fake_train)
  changed = ensure_autoencoder(cache, **dict(settings, kl_weight=1e-5))
  assert changed != folder and len(calls) == 1 and calls[0].kl_weight == 1e-5
  assert ensure_autoencoder(cache, **dict(settings, kl_weight=1e-5)) == changed and len(calls) == 1
  # An intermediate export (fewer steps than asked) is not a finished one.
  info_path = os.path.join(changed, loop_lib.TRAINING_INFO)
  info = json.load(open(info_path))
  json.dump(dict(info, step=info['step'] - 1), open(info_path, 'w'))
  ensure_autoencoder(cache, **dict(settings, kl_weight=1e-5))
  assert len(calls) == 2


def test_resume_equals_an_uninterrupted_run(tmp_path):
  cfg = AETrainConfig(**dict(SMALL, steps=8, checkpoint_every=3))
  train(cfg, str(tmp_path / 'straight'))
  first = train(cfg, str(tmp_path / 'resumed'), stop_after=5)  # checkpoints at 3 and (forced) 5
  assert first['step'] == 5 and not os.path.exists(tmp_path / 'resumed' / 'export')
  train(cfg, str(tmp_path / 'resumed'))
  a, _ = _restored_params(str(tmp_path / 'straight'), cfg)
  b, _ = _restored_params(str(tmp_path / 'resumed'), cfg)
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state)), strict=True):
    np.testing.assert_array_equal(x, y)
  _, pa = ae.from_diffusers(tmp_path / 'straight' / 'export')
  _, pb = ae.from_diffusers(tmp_path / 'resumed' / 'export')
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_command_line_and_bf16(tmp_path):
  """The config-file command line end to end (a variant and typed overrides), in its own process as it is run."""
  cmd = [
    sys.executable,
    '-m',
    'lpl_jax.train_autoencoder',
    '--config=configs/autoencoder.py:f4',
    f'--workdir={tmp_path}',
    '--config.resolution=16',
    '--config.batch_size=4',
    '--config.steps=3',
    '--config.dtype=bfloat16',
    '--config.log_every=1',
    '--config.rec_loss=l1+l2',
    '--config.scale_images=32',
    '--config.eval_images=8',
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = read_training_info(str(tmp_path / 'export'))
  assert info['step'] == 3 and info['settings']['dtype'] == 'bfloat16' and np.isfinite(info['heldout_psnr'])
  assert info['settings']['rec_loss'] == 'l1+l2' and info['settings']['widths'] == [32, 64, 128]  # the f4 variant
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['step'] == 3 and summary['heldout_psnr'] == pytest.approx(info['heldout_psnr'])
  model, _ = ae.from_diffusers(tmp_path / 'export')
  assert model.config.downsample_factor == 4
