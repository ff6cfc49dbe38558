"""Post-training a pretrained denoiser: `init.checkpoint` naming a diffusers `DiTTransformer2DModel` folder (a small
DiT with a learned variance, random weights saved by diffusers' `save_pretrained`), through `python -m lpl_jax.main`
with LPL on the embedded photographs, and the run's EMA weights exported back to diffusers."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lpl_jax import models
from lpl_jax.train import build, loop
from tests.models import torch_ref
from tests.run import common

# The demo config's DiT: 4 blocks of width 128 (4 heads of 32), patch 2, 16 classes, on the tiny autoencoder's
# 8 x 8 x 4 latents of 32 px images; with a learned variance, 8 output channels.
DEMO_DIT = dict(
  num_layers=4,
  attention_head_dim=32,
  num_attention_heads=4,
  in_channels=4,
  out_channels=8,
  patch_size=2,
  sample_size=8,
  num_embeds_ada_norm=16,
)
DIT_DIFFUSION = ('--config.model.learn_sigma=True', '--config.diffusion.schedule=linear')
DIT_OVERRIDES = {
  'model.learn_sigma': True,
  'diffusion.schedule': 'linear',
  'diffusion.beta_start': 1e-4,
  'diffusion.beta_end': 0.02,
}


def _aligned(ref):
  """diffusers' DiT with one set of embedders and the official DiT's two constants (its timestep frequencies divide
  by half, its pre-MLP LayerNorm epsilon is 1e-6), which the converted public checkpoints were trained with."""
  emb0 = ref.transformer_blocks[0].norm1.emb
  for blk in ref.transformer_blocks:
    blk.norm1.emb.load_state_dict(emb0.state_dict())
    blk.norm1.emb.time_proj.downscale_freq_shift = 0
    blk.norm3.eps = 1e-6
  return ref


def _diffusers_out(ref, x, t, y):
  import torch

  with torch.no_grad():
    out = ref(
      torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()),
      timestep=torch.from_numpy(t),
      class_labels=torch.from_numpy(y).long(),
    ).sample
  return np.transpose(out.numpy(), (0, 2, 3, 1))


@pytest.fixture(scope='module')
def dit_folder(tmp_path_factory):
  import torch
  from diffusers import DiTTransformer2DModel

  torch.manual_seed(0)
  ref = DiTTransformer2DModel(**DEMO_DIT).eval()
  torch_ref.randomize_(ref, seed=11)
  _aligned(ref)
  folder = tmp_path_factory.mktemp('dit') / 'transformer'
  ref.save_pretrained(folder)
  return folder, ref


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  return x, np.array([10.0, 700.0], np.float32), np.array([3, 16], np.int32)  # 16: the null class


def test_a_pretrained_folder_of_another_architecture_is_named(dit_folder):
  folder, _ = dit_folder
  exp = common.experiment('demo_cpu.py', 'post,lpl', **{'init.checkpoint': str(folder), **DIT_OVERRIDES})
  model = build.make_denoiser(exp.replace(model={'depth': 2, 'learn_sigma': False}), latent_channels=4)
  with pytest.raises(
    ValueError, match=r'model\.depth = 2, the weights 4; model\.learn_sigma = False, the weights True'
  ):
    build.import_denoiser(model, str(folder))


@pytest.mark.slow
def test_post_training_an_imported_dit_with_lpl_and_exporting_it(env, dit_folder, tmp_path):
  """Params and EMA start as the imported weights (the model's output is diffusers'), two LPL post-training steps run
  through the CLI, and the EMA weights they produce, exported, give diffusers' module our outputs."""
  folder, ref = dit_folder
  x, t, y = _inputs()
  exp = common.experiment('demo_cpu.py', 'post,lpl', **{'init.checkpoint': str(folder), **DIT_OVERRIDES})
  run = loop.setup(exp, compile_step=False)  # restore_init only: the CLI run below compiles the step
  state = loop.restore_init(run)
  want = _diffusers_out(ref, x, t, y)
  for params in (state.params, state.ema_params):
    got = np.asarray(jax.jit(run.model.apply)({'params': params}, x, t, y))
    assert got.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  workdir = tmp_path / 'post'
  common.run_main(
    env,
    'post,lpl',
    workdir,
    f'--config.init.checkpoint={folder}',
    *DIT_DIFFUSION,
    '--config.diffusion.beta_start=0.0001',
    '--config.diffusion.beta_end=0.02',
    '--config.total_steps=2',
    '--config.checkpoint_every=2',
  )
  metrics = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [m['step'] for m in metrics] == [1, 2]
  assert all(np.isfinite(m['loss/total']) and m['loss/lpl'] > 0 for m in metrics)
  assert os.path.exists(workdir / 'samples' / '00000002.png')

  ema = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '2', 'state'))['ema_params']
  export = tmp_path / 'export'
  models.save_diffusers(export, run.model, ema, sample_size=8)  # the latent side: diffusers' positions are ours there
  from diffusers import DiTTransformer2DModel

  exported = _aligned(DiTTransformer2DModel.from_pretrained(export).eval())
  ours = np.asarray(jax.jit(run.model.apply)({'params': ema}, x, t, y))
  assert np.abs(ours - want).max() > 0  # the steps moved the EMA weights
  np.testing.assert_allclose(_diffusers_out(exported, x, t, y), ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
