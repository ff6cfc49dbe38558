"""Every config in configs/ builds and validates, and its train step lowers for abstract inputs; bad configs give
the promised errors before anything compiles."""

import json

import numpy as np
import pytest

from lpl_jax import data as data_lib
from lpl_jax import diffusion
from lpl_jax.train import build
from lpl_jax.train import config as config_lib
from lpl_jax.train.config import ConfigError, Experiment, step_config
from lpl_jax.train.validate import validate
from tests.run import common


def test_every_config_file_lists_its_variants():
  assert {'demo_cpu.py', 'imagenet.py', 'cc12m.py', 'sd3.py'} <= set(common.CONFIG_FILES)
  variants = dict.fromkeys(common.CONFIG_FILES, 0)
  for name, _ in common.all_variants():
    variants[name] += 1
  assert variants['imagenet.py'] == 19 and variants['cc12m.py'] == 5 and variants['demo_cpu.py'] >= 3
  assert variants['sd3.py'] == 4


@pytest.mark.parametrize('name,variant', common.all_variants())
def test_config_builds_and_validates(name, variant):
  exp = common.experiment(name, variant)
  devices = 1 if name == 'demo_cpu.py' else 8
  validate(exp, num_devices=devices, check_files=False)
  cfg = step_config(exp, num_devices=devices)
  assert (cfg.lpl is not None) == ('lpl' in variant.split(','))
  if cfg.lpl is not None:
    assert cfg.lpl_rows_per_group > 0
    if name in ('imagenet.py', 'cc12m.py') and 'dit' not in variant:
      assert exp.optim.ema_decay == 0.99975


def test_paper_settings():
  c = common.load('imagenet.py').get_config('post512,lpl,flow')
  assert (c.data.resolution, c.total_steps, c.sample.guidance) == (512, 120_000, 2.0)
  loss = step_config(Experiment.from_config_dict(c), num_devices=8)
  assert (loss.lpl.weight, loss.lpl.gate, loss.lpl.tau, loss.lpl_normalize) == (3.0, 'snr', 5.0, 'batch')
  assert (c.diffusion.formulation, c.diffusion.timesteps, c.sample.sampler) == ('flow_ot', 'mode', 'euler')
  for name, variant in common.all_variants():  # Tables 2-3: the asymmetric autoencoder; the demo its own
    preset = common.experiment(name, variant).autoencoder.preset
    if name in ('imagenet.py', 'cc12m.py') and 'dit' not in variant:
      assert preset == 'asymmetric_x1_5', (name, variant)
  v = common.load('imagenet.py').get_config('post256,v')
  assert v.diffusion.zero_terminal_snr and v.optim.ema_decay == 0.9999 and v.sample.guidance == 1.5
  with pytest.raises(ValueError, match="unknown config variant token 'lpk'"):
    common.load('imagenet.py').get_config('post512,lpk')


ZERO_TERMINAL_SNR = [(n, v) for n, v in common.all_variants() if common.experiment(n, v).diffusion.zero_terminal_snr]


@pytest.mark.parametrize('name,variant', ZERO_TERMINAL_SNR)
def test_zero_terminal_snr_configs_sample_from_the_last_timestep_as_diffusers_trailing_ddim(name, variant):
  import jax
  import torch
  from diffusers import DDIMScheduler

  from lpl_jax import diffusion
  from lpl_jax.train.config import formulation
  from tests.diffusion.test_samplers import _nchw, _nhwc, rel, stand_in_jax, stand_in_torch

  exp = common.experiment(name, variant)
  d, s = exp.diffusion, exp.sample
  assert (s.sampler, s.spacing, d.formulation) == ('ddim', 'trailing', 'ddpm_v')
  form = formulation(d)
  grid = diffusion.ddpm_timesteps(form.num_timesteps, s.steps, s.spacing)
  assert grid[0] == form.num_timesteps - 1 == 999  # where the SNR is 0
  sched = DDIMScheduler(
    beta_schedule=d.schedule,
    beta_start=d.beta_start,
    beta_end=d.beta_end,
    prediction_type='v_prediction',
    timestep_spacing='trailing',
    rescale_betas_zero_snr=True,
    clip_sample=False,
    set_alpha_to_one=True,
  )
  sched.set_timesteps(s.steps)
  np.testing.assert_array_equal(grid, sched.timesteps.numpy())
  x_init = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
  x = _nchw(x_init)
  with torch.no_grad():
    for t in sched.timesteps:
      x = sched.step(stand_in_torch(x, t), t, x).prev_sample
  settings = dict(sampler=s.sampler, num_steps=s.steps, eta=s.eta, timestep_spacing=s.spacing)
  out = jax.jit(lambda z: diffusion.sample(stand_in_jax, form, z, jax.random.key(0), **settings))(x_init)
  assert rel(out, _nhwc(x)) <= 1e-4
  with pytest.raises(ConfigError, match="sample.spacing='leading' with diffusion.zero_terminal_snr"):
    validate(exp.replace(sample={'spacing': 'leading'}), num_devices=8, check_files=False)


def test_public_dit_settings():
  """The dit variants keep DiT's own diffusion (Peebles & Xie 2023, section 3 and appendix; its `create_diffusion`):
  linear betas 1e-4..2e-2 over 1000 steps, learned sigma, sd-vae-ft (scaling 0.18215), 1000 classes + null."""
  for res in (256, 512):
    exp = common.experiment('imagenet.py', f'post{res},dit,lpl')
    m, d = exp.model, exp.diffusion
    assert (m.kind, m.patch_size, m.hidden_size, m.depth, m.num_heads, m.learn_sigma) == ('dit', 2, 1152, 28, 16, True)
    assert (d.formulation, d.schedule, d.beta_start, d.beta_end, d.zero_terminal_snr) == (
      'ddpm_eps',
      'linear',
      1e-4,
      0.02,
      False,
    )
    assert (m.num_classes, exp.autoencoder.preset, exp.data.resolution, exp.init.required) == (1000, 'sd1', res, True)
    assert (exp.sample.sampler, exp.sample.steps, exp.sample.guidance) == ('ddpm', 250, 1.5)
    # DiT's `space_timesteps(1000, '250')`: one section, a fractional stride of 999 / 249 from 0, rounded.
    respaced = sorted({round(i * 999 / 249) for i in range(250)})
    grid = diffusion.ddpm_timesteps(1000, exp.sample.steps, exp.sample.spacing)
    np.testing.assert_array_equal(grid[::-1], respaced)
    ac = config_lib.formulation(d).alphas_cumprod
    betas = 1 - ac / np.concatenate([[1.0], ac[:-1]])
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-5)
  with pytest.raises(ValueError, match='post-train the public DiT-XL/2, a DDPM-eps model'):
    common.load('imagenet.py').get_config('post256,dit,flow')


def test_sd3_settings():
  exp = common.experiment('sd3.py', 'post1024,lpl')
  m, d = exp.model, exp.diffusion
  assert (m.kind, m.depth, m.hidden_size, m.num_heads, m.context_dim, m.context_len, m.pooled_dim) == (
    'mmdit',
    24,
    1536,
    24,
    4096,
    333,
    2048,
  )
  assert m.pos_embed_base_size == 64
  assert (m.pos_embed_max_size, m.qk_norm, exp.autoencoder.preset, exp.data.resolution) == (192, False, 'sd3', 1024)
  assert (d.formulation, d.timesteps, d.shift, exp.sample.sampler) == ('flow_ot', 'logit_normal', 3.0, 'euler')
  with pytest.raises(ValueError, match='post512\\[,lpl\\] or post1024'):
    common.load('sd3.py').get_config('post256')


def test_pretrained_weights_have_no_optimizer_state(tmp_path):
  folder = tmp_path / 'transformer'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps({'_class_name': 'DiTTransformer2DModel'}))
  exp = _demo(**{'init.checkpoint': str(folder), 'init.keep_optimizer': True})
  with pytest.raises(ConfigError, match='holds pretrained weights, not a run'):
    validate(exp, num_devices=1)
  with pytest.raises(ConfigError, match="init.checkpoint='.*missing.pt' is not a file"):
    validate(_demo(**{'init.checkpoint': str(tmp_path / 'missing.pt')}), num_devices=1)
  assert build.is_pretrained(str(folder)) and build.is_pretrained('weights.pt')
  assert not build.is_pretrained(str(tmp_path))


def _demo(**overrides):
  return common.experiment('demo_cpu.py', 'post,lpl', **overrides)


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('data.resolution', 36, "data.resolution=36 is not a multiple of the autoencoder's downsampling factor 8"),
    ('model.patch_size', 3, 'do not split into model.patch_size=3 patches'),
    ('data.global_batch', 12, 'data.global_batch=12 does not split over 8 devices'),
    ('step.accum_steps', 4, 'does not split over 8 devices x step.accum_steps=4'),
    ('diffusion.formulation', 'ddpm_q', "diffusion: unknown formulation 'ddpm_q'"),
    ('sample.sampler', 'euler', "sample.sampler='euler' does not fit diffusion.formulation='ddpm_eps'"),
    ('model.num_heads', 5, 'not a multiple of model.num_heads=5'),
    ('data.source', 'hub:imagenet', "data.source='hub:imagenet'"),
    ('model.dtype', 'float16', "model.dtype='float16'"),
    ('lpl.num_blocks', 9, 'lpl: decoder has 4 up blocks, LPLConfig.num_blocks asks for 9'),
    ('optim.lr', -1.0, 'optim: invalid optimizer config'),
    ('lpl.normalize', 'gated', "lpl.normalize='gated'; expected 'batch', 'rows', or '' for the preset's"),
    ('lpl.tau', 0.01, 'lpl.enabled but no row gets LPL'),
    ('data.global_batch', 0, 'data.global_batch=0; expected > 0'),
    ('mesh.fsdp', 3, 'mesh: mesh fsdp=3 does not divide the 8 devices'),
    ('diffusion.timesteps', 'cosine', "diffusion: unknown timestep sampler 'cosine'"),
    ('lpl.preset', 'papers', "lpl: unknown LPL preset 'papers'"),
    ('sample.spacing', 'uniform', "sample.spacing='uniform'; known: ('leading', 'trailing', 'linspace')"),
    ('guard.loss_spike', 0.5, 'guard.loss_spike=0.5; expected 0 (off) or a factor > 1'),
    ('lpl.norm_axis', 'rows', "lpl: LPLConfig.norm_axis='rows'"),
    ('step.loss_weighting', 'snr', "step.loss_weighting='snr'; expected one of"),
    ('step.min_snr_gamma', 0.0, 'step.min_snr_gamma=0.0; expected > 0'),
    ('step.stats_decay', 1.0, 'step.stats_decay=1.0; expected in'),
    ('model.pos_embed_max_size', 16, "model.pos_embed_max_size (SD3's cropped positions) is for model.kind = mmdit"),
    ('diffusion.vb_weight', -1.0, 'diffusion.vb_weight=-1.0; expected >= 0'),
  ],
)
def test_inconsistent_config_is_named(field, value, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    validate(_demo(**{field: value}), num_devices=8, check_files=False)


def test_the_config_must_declare_every_field_and_no_other():
  c = common.load('demo_cpu.py').get_config('post,lpl')
  del c.data['prefetch']
  c.model.unknown_field = 1
  with pytest.raises(ConfigError, match=r'missing data\.prefetch; unknown model\.unknown_field\. Every field'):
    Experiment.from_config_dict(c)
  with pytest.raises(ConfigError, match=r"total_steps='10'; expected int"):
    Experiment.from_config_dict(dict(common.load('demo_cpu.py').get_config('post').to_dict(), total_steps='10'))


def test_a_run_config_round_trips_through_json():
  exp = _demo()
  assert Experiment.from_config_dict(json.loads(exp.to_json())) == exp


def test_eq15_weighting_needs_lpl():
  with pytest.raises(ConfigError, match="step.loss_weighting='lpl_variance' \\(Eq. 15\\) needs lpl.enabled=True"):
    validate(_demo(**{'lpl.enabled': False, 'step.loss_weighting': 'lpl_variance'}), num_devices=1, check_files=False)


def test_an_older_run_config_loads_with_the_values_it_ran_with(tmp_path):
  """A run's config.json written before fields were added (sampling and evaluating it must keep working)."""
  tree = json.loads(_demo().to_json())
  for dotted in config_lib.ADDED_FIELDS:
    *sections, name = dotted.split('.')
    node = tree
    for section in sections:
      node = node[section]
    del node[name]
  (tmp_path / 'config.json').write_text(json.dumps(tree))
  exp = config_lib.load_run(str(tmp_path))
  assert exp.lpl.stats_gradient is True and exp.model.modulation == 'block' and exp.step.loss_weighting == 'none'
  assert exp.guard.loss_spike == 0 and exp.sample.spacing == 'leading'
  assert exp.replace(lpl={'stats_gradient': False}) == _demo()


def test_files_a_config_names_are_checked(tmp_path):
  exp = common.experiment('imagenet.py', 'post512,lpl')
  with pytest.raises(ConfigError, match='autoencoder.weights is empty'):
    validate(exp, num_devices=1)
  exp = exp.replace(autoencoder={'allow_random_weights': True})
  with pytest.raises(ConfigError, match='--config.init.checkpoint=WORKDIR'):
    validate(exp, num_devices=1)
  with pytest.raises(ConfigError, match='is not a folder'):
    validate(exp.replace(init={'checkpoint': str(tmp_path / 'missing')}), num_devices=1)


def test_latent_cache_shapes_must_match_the_config(tmp_path):
  path = str(tmp_path / 'cache')
  with data_lib.LatentCacheWriter(path, resolution=64, scaling_factor=1.0) as w:
    w.add(np.zeros((2, 8, 8, 4), np.float32), np.zeros(2, np.int32), text=np.zeros((2, 7, 16), np.float32))
  exp = _demo(**{'data.source': f'cache:{path}'})
  with pytest.raises(ConfigError, match=r'holds \(8, 8, 4\) latents but data.resolution=32'):
    validate(exp, num_devices=1)
  exp = exp.replace(data={'resolution': 64})
  validate(exp, num_devices=1)
  exp = exp.replace(model={'kind': 'mmdit', 'context_dim': 32, 'context_len': 7})
  with pytest.raises(ConfigError, match=r'context_len/context_dim = \(7, 32\)'):
    validate(exp, num_devices=1)


def _check_lowered(exp):
  """The lowered step is the train step, and holds the LPL switch (a `lax.cond`) exactly when LPL is on."""
  text = build.lower_train_step(exp).as_text()
  assert text.startswith('module @jit_train_step') and 'func.func public @main' in text
  assert ('stablehlo.case' in text) == exp.lpl.enabled
  return text


def test_demo_step_lowers_with_the_models_sharding_constraints():
  """The step is traced with the logical axis rules in force: the DiT's token-stream constraints (before the blocks
  and after each) become sharding constraints, in the forward pass and in its transpose."""
  exp = _demo()
  text = _check_lowered(exp)
  assert text.count('sdy.sharding_constraint') == 2 * (exp.model.depth + 1)


LOWERED = [
  nv
  for nv in common.all_variants()
  if (nv[0] in ('imagenet.py', 'cc12m.py') and 'dit' not in nv[1])
  or nv in (('imagenet.py', 'post512,dit,lpl'), ('sd3.py', 'post512,lpl'))
]


@pytest.mark.slow
@pytest.mark.parametrize('name,variant', LOWERED)
def test_paper_config_step_lowers(name, variant):
  """Each paper config's step (MMDiT, SD decoder, LPL, its resolution, formulation and conditioning), and one of
  each recipe that post-trains a public model, traced and lowered on abstract shapes. The denoiser is cut to 2 of
  its blocks here, which changes no shape (tracing 28 blocks takes ~20 s per config on 2 cores); the full depth is
  lowered for two configs below."""
  _check_lowered(common.experiment(name, variant, **{'model.depth': 2}))


@pytest.mark.slow
@pytest.mark.parametrize('name,variant', [('imagenet.py', 'post512,lpl,flow'), ('cc12m.py', 'post256,lpl')])
def test_paper_config_step_lowers_at_full_depth(name, variant):
  exp = common.experiment(name, variant)
  assert exp.model.depth == 28 and exp.model.hidden_size == 1536
  _check_lowered(exp)


def test_ema_warmup_is_refused_in_post_training_unless_the_ema_restarts():
  # The warmup's n counts from 0 after init.checkpoint: at decay 0.998 it would hold the decay below 0.998 for the
  # first 4490 steps, so the configured decay would never act in a short post-training run.
  post = {'init.checkpoint': 'runs/pre', 'optim.ema_warmup': True, 'optim.ema_decay': 0.998}
  with pytest.raises(ConfigError, match='optim.ema_warmup=True with init.checkpoint=.* for about 4490 steps'):
    validate(_demo(**post), num_devices=1, check_files=False)
  assert (1 + 4490) / (10 + 4490) >= 0.998 > (1 + 4489) / (10 + 4489)
  validate(_demo(**post, **{'optim.ema_start_step': 100}), num_devices=1, check_files=False)
  validate(_demo(**{'optim.ema_warmup': True}), num_devices=1, check_files=False)  # from scratch: the warmup's job
  for variant in ('post', 'post,lpl'):  # the demo's post-training configs pass
    validate(
      common.experiment('demo_cpu.py', variant, **{'init.checkpoint': 'runs/pre'}), num_devices=1, check_files=False
    )
