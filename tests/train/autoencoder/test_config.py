"""configs/autoencoder.py against `AETrainConfig` (every variant valid, defaults equal, the promised errors), bad
input on the command line, and a non-finite loss stopping a run (with a stand-in state and step, so nothing
compiles)."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lpl_jax.train.autoencoder import AETrainConfig, train
from lpl_jax.train.autoencoder import loop as loop_lib
from lpl_jax.train.autoencoder import step as step_lib
from lpl_jax.train.autoencoder.config import PRESET_VALUE
from lpl_jax.train.checkpoint import Checkpointer
from lpl_jax.train.errors import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _config_file():
  """configs/autoencoder.py loaded by path, as `--config=configs/autoencoder.py` loads it."""
  spec = importlib.util.spec_from_file_location('autoencoder_config', os.path.join(ROOT, 'configs', 'autoencoder.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(*args):
  return subprocess.run(
    [sys.executable, '-m', 'lpl_jax.train_autoencoder', *args],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize('variant', _config_file().VARIANTS)
def test_every_variant_is_a_valid_run(variant):
  cfg = AETrainConfig.from_config_dict(_config_file().get_config(variant))
  tokens = variant.split(',')
  assert cfg.autoencoder_config().downsample_factor == (4 if 'f4' in tokens else 8)
  assert cfg.widths == ((32, 64, 128) if 'f4' in tokens else None)
  gan = dict(perceptual_weight=0.1, disc_weight=0.5, disc_start=1000)
  assert {k: getattr(cfg, k) for k in gan} == (gan if 'gan' in tokens else dict.fromkeys(gan, 0))


def test_variants_combine_and_the_list_names_them_all():
  module = _config_file()
  assert set(module.VARIANTS) == {'', 'f4', 'gan', 'f4,gan'}
  both = AETrainConfig.from_config_dict(module.get_config('f4,gan'))
  assert both == AETrainConfig.from_config_dict(module.get_config('gan,f4'))
  assert both.widths == (32, 64, 128) and both.disc_weight == 0.5


def test_the_default_variant_equals_the_dataclass_defaults():
  """The file declares every field with the dataclass's default, so neither can change without the other."""
  module = _config_file()
  c = module.get_config()
  assert sorted(c) == sorted(f.name for f in dataclasses.fields(AETrainConfig))  # every field, no other
  assert AETrainConfig.from_config_dict(c) == AETrainConfig()
  assert AETrainConfig.from_config_dict(module.get_config('')) == AETrainConfig()
  for name, preset_value in PRESET_VALUE.items():
    assert c[name] == preset_value and getattr(AETrainConfig(), name) is None
  assert AETrainConfig().settings_hash() == AETrainConfig.from_config_dict(c).settings_hash()


def test_overrides_keep_their_type_and_zero_means_the_preset():
  c = _config_file().get_config()
  c.widths, c.layers_per_block, c.latent_channels = (8, 16), 2, 8
  cfg = AETrainConfig.from_config_dict(c)
  assert (cfg.widths, cfg.layers_per_block, cfg.latent_channels) == ((8, 16), 2, 8)
  assert cfg.autoencoder_config().latent_channels == 8
  # A plain mapping works too, with None for the preset's value.
  plain = dict(c.to_dict(), widths=None, layers_per_block=0)
  assert AETrainConfig.from_config_dict(plain).widths is None
  with pytest.raises(ValueError, match='layers_per_block must be >= 1'):
    AETrainConfig.from_config_dict(dict(plain, layers_per_block=-1))


def test_unknown_or_missing_fields_are_named():
  c = _config_file().get_config()
  with c.unlocked():
    c.disc_strat = 1000
  with pytest.raises(ValueError, match=r'unknown fields disc_strat'):
    AETrainConfig.from_config_dict(c)
  values = _config_file().get_config().to_dict()
  del values['kl_weight'], values['seed']
  with pytest.raises(ValueError, match=r'missing fields kl_weight, seed'):
    AETrainConfig.from_config_dict(values)


def test_unknown_variant_token_names_it_and_the_known_ones():
  with pytest.raises(ValueError, match=r"'gna'.*known: f4, gan"):
    _config_file().get_config('f4,gna')


def test_command_line_bad_input_is_one_error_line_before_training(tmp_path):
  for args, expected in (
    (['--config.rec_loss=l3'], "rec_loss='l3'"),
    (['--config=configs/autoencoder.py:f4', '--config.disc_strat=5'], "no field 'disc_strat'"),
    (['--config=configs/autoencoder.py:f5'], "'f5'"),
    (['--config.steps=many'], '--config.steps=many'),
  ):
    proc = _run(f'--workdir={tmp_path / "run"}', *args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, (args, proc.stderr[-2000:])
    assert 'Traceback' not in proc.stderr, args
    assert not os.path.exists(tmp_path / 'run'), args  # nothing was created: the run never started


def test_command_line_cache_hit_prints_the_export_folder(tmp_path):
  """`--cache` with the config file's settings finds a finished export (a stand-in info file) and trains nothing."""
  cfg = AETrainConfig.from_config_dict(_config_file().get_config('f4'))
  cfg = dataclasses.replace(cfg, steps=7)
  folder = tmp_path / f'ae-{cfg.settings_hash()[:16]}' / 'export'
  folder.mkdir(parents=True)
  (folder / loop_lib.TRAINING_INFO).write_text(json.dumps(dict(settings_hash=cfg.settings_hash(), step=7)))
  proc = _run('--config=configs/autoencoder.py:f4', f'--cache={tmp_path}', '--config.steps=7')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == str(folder)
  assert sorted(os.listdir(folder.parent)) == ['export']  # no checkpoints, no metrics: nothing trained


def test_a_non_finite_loss_stops_the_run_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
  cfg = AETrainConfig(
    widths=(8, 16),
    layers_per_block=1,
    resolution=16,
    batch_size=4,
    steps=6,
    scale_images=8,
    eval_images=8,
    log_every=1,
    checkpoint_every=1,
  )

  def fake_create_state(*args):  # the real one compiles the autoencoder's initialisation (about 15 s on a CPU)
    return step_lib.AEState(
      step=jnp.zeros((), jnp.int32),
      params={'w': jnp.zeros(3)},
      opt_state=(),
      disc_params=None,
      disc_opt_state=None,
      rng=jax.random.key(0),
    )

  def fake_jit_train_step(*args, **kwargs):
    def step(state, batch):
      del batch
      state = state.replace(step=state.step + 1, params={'w': state.params['w'] + 1})
      return state, {'loss': jnp.where(state.step >= 3, jnp.nan, 1.0), 'l1': jnp.ones(())}

    return step

  monkeypatch.setattr(step_lib, 'create_state', fake_create_state)
  monkeypatch.setattr(step_lib, 'jit_train_step', fake_jit_train_step)
  with pytest.raises(NonFiniteLossError) as e:
    train(cfg, str(tmp_path))
  assert e.value.step == 3 and list(e.value.terms) == ['loss'] and math.isnan(e.value.terms['loss'])
  assert str(tmp_path / 'checkpoints') in str(e.value)
  ckpt = Checkpointer(tmp_path / 'checkpoints', save_every=1)
  restored, _, step = ckpt.restore(fake_create_state())
  ckpt.close()
  assert step == 2 and float(restored.params['w'][0]) == 2  # step 3 was not saved
  logged = open(tmp_path / 'metrics.jsonl').read().splitlines()
  assert len(logged) == 2 and not os.path.exists(tmp_path / 'export')
