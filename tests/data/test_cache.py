"""Latent cache: writer/reader layout, atomic writes, posterior sampling, `encode_to_cache` against encoding the
pipeline's images directly, and `python -m lpl_jax.encode` in subprocesses."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from lpl_jax import autoencoder as ae
from lpl_jax import data
from tests.autoencoder.common import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pipeline(source, **kw):
  args = dict(global_batch=4, seed=0, shuffle=False, process_index=0, process_count=1)
  args.update(kw)
  return data.make_latent_pipeline(source, **args)


def write(path, count=10, shard_size=4, store_std=True, text=True, scale=2.0, shift=-0.5, **kw):
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(count, 2, 3, 4)).astype(np.float32)
  std = rng.uniform(0.1, 0.5, size=mean.shape).astype(np.float32)
  labels = rng.integers(0, 5, count).astype(np.int32)
  emb = rng.normal(size=(count, 3, 8)).astype(np.float32)
  with data.LatentCacheWriter(
    path, resolution=16, scaling_factor=scale, shift_factor=shift, store_std=store_std, shard_size=shard_size, **kw
  ) as w:
    for lo in range(0, count, 3):  # batches that do not line up with the shards
      sl = slice(lo, lo + 3)
      w.add(mean[sl], labels[sl], std[sl] if store_std else None, emb[sl] if text else None)
  return mean, std, labels, emb


def test_writer_layout_and_source_records(tmp_path):
  path = tmp_path / 'cache'
  mean, std, labels, emb = write(path)
  index = json.loads((path / 'index.json').read_text())
  assert index['count'] == 10 and index['num_shards'] == 3 and index['latents'] == 'raw'
  assert sorted(os.listdir(path)) == sorted(
    ['index.json', 'labels.npy'] + [f'{k}-0000{s}.npy' for k in ('mean', 'std', 'text') for s in range(3)]
  )
  np.testing.assert_array_equal(np.load(path / 'mean-00002.npy'), mean[8:])  # raw on disk
  src = data.LatentCacheSource(path)
  assert len(src) == 10 and src.latent_shape == (2, 3, 4) and src.resolution == 16 and src.has_std
  for i in (0, 5, 9):
    rec = src[i]
    np.testing.assert_allclose(rec['latent'], (mean[i] + 0.5) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(rec['latent_std'], std[i] * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(rec['text'], emb[i])
    assert int(rec['label']) == labels[i]
  batches = list(pipeline(src, sample_posterior=False, num_epochs=1))
  assert len(batches) == 2 and sorted(batches[0]) == ['labels', 'latents', 'text']
  np.testing.assert_allclose(batches[1]['latents'], (mean[4:8] + 0.5) * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(batches[1]['text'], emb[4:8])
  np.testing.assert_array_equal(batches[1]['labels'], labels[4:8])


def test_posterior_sampling(tmp_path):
  mean, std, _, _ = write(tmp_path / 'c', count=64, shard_size=64, text=False)
  src = data.LatentCacheSource(tmp_path / 'c')
  a = list(pipeline(src, global_batch=64, num_epochs=1))[0]['latents']
  b = list(pipeline(src, global_batch=64, num_epochs=1))[0]['latents']
  c = list(pipeline(src, global_batch=64, num_epochs=1, seed=1))[0]['latents']
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  eps = (a - (mean + 0.5) * 2.0) / (std * 2.0)  # the scaled sample is scale * (mean + std * eps - shift)
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
  assert 'text' not in list(pipeline(src, global_batch=64, num_epochs=1))[0]


def test_writes_are_atomic(tmp_path):
  path = tmp_path / 'c'
  write(path, count=6)
  before = (path / 'mean-00000.npy').read_bytes()
  with pytest.raises(FileExistsError, match='already exists'):
    write(path)
  with pytest.raises(RuntimeError, match='interrupted'):
    with data.LatentCacheWriter(path, resolution=16, scaling_factor=1.0, overwrite=True) as w:
      w.add(np.zeros((2, 2, 3, 4)), np.zeros(2))
      raise RuntimeError('interrupted')
  assert (path / 'mean-00000.npy').read_bytes() == before  # the old cache survives a failed overwrite
  assert sorted(os.listdir(tmp_path)) == ['c']  # and no temporary folder is left behind
  write(path, count=5, overwrite=True, scale=1.0)
  assert len(data.LatentCacheSource(path)) == 5 and sorted(os.listdir(tmp_path)) == ['c']


def test_cache_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist; write one with `python -m lpl_jax.encode'):
    data.LatentCacheSource(tmp_path / 'nothing')
  write(tmp_path / 'c', count=8)
  src = data.LatentCacheSource(tmp_path / 'c')
  with pytest.raises(ValueError, match='encoded at resolution 16, the pipeline asks for 32'):
    pipeline(src, resolution=32)
  with pytest.raises(ValueError, match='global batch 4 is not divisible by the process count 3'):
    pipeline(src, process_index=0, process_count=3)
  with data.LatentCacheWriter(tmp_path / 'd', resolution=16, scaling_factor=1.0, store_std=False) as w:
    w.add(np.zeros((2, 2, 3, 4)), np.zeros(2))
    with pytest.raises(ValueError, match='store_std=False but add got std=True'):
      w.add(np.zeros((2, 2, 3, 4)), np.zeros(2), std=np.ones((2, 2, 3, 4)))
    with pytest.raises(ValueError, match='differ from the earlier'):
      w.add(np.zeros((2, 4, 4, 4)), np.zeros(2))
  os.remove(tmp_path / 'c' / 'std-00001.npy')
  with pytest.raises(FileNotFoundError, match="missing shard files \\['std-00001.npy'\\]"):
    data.LatentCacheSource(tmp_path / 'c')


def test_source_checks_every_file_when_opened(tmp_path):
  path = tmp_path / 'c'
  mean, std, labels, emb = write(path)  # 10 records in shards of 4: the last holds 2
  files = {name: (path / name).read_bytes() for name in os.listdir(path)}

  def corrupt_and_open(name, content):
    (path / name).write_bytes(content)
    try:
      data.LatentCacheSource(path)
    finally:
      (path / name).write_bytes(files[name])

  shard = path / 'mean-00001.npy'
  size = len(files['mean-00001.npy'])
  with pytest.raises(
    data.DataError,
    match=f'shard {re.escape(repr(str(shard)))} holds {size - 100} bytes but its '
    f'header \\(float32 \\(4, 2, 3, 4\\)\\) needs {size}: the file is truncated',
  ):
    corrupt_and_open('mean-00001.npy', files['mean-00001.npy'][:-100])
  with pytest.raises(data.DataError, match='std-00000.npy.* holds .* needs .*: the file has trailing bytes'):
    corrupt_and_open('std-00000.npy', files['std-00000.npy'] + b'\0' * 8)

  def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()

  with pytest.raises(
    data.DataError, match=re.escape("std-00002.npy' holds float32 (3, 2, 3, 4) but the index says float32 (2, 2, 3, 4)")
  ):
    corrupt_and_open('std-00002.npy', npy(std[:3]))  # a last shard with a row too many
  with pytest.raises(
    data.DataError, match=re.escape("text-00000.npy' holds float16 (4, 3, 8) but the index says float32 (4, 3, 8)")
  ):
    corrupt_and_open('text-00000.npy', npy(emb[:4].astype(np.float16)))
  with pytest.raises(data.DataError, match=re.escape("labels.npy' holds int32 (9,) but the index says int32 (10,)")):
    corrupt_and_open('labels.npy', npy(labels[:9]))
  with pytest.raises(data.DataError, match="text-00001.npy' is not a .npy file \\(.*\\); re-encode or re-copy"):
    corrupt_and_open('text-00001.npy', b'garbage, not an array')
  with pytest.raises(data.DataError, match="mean-00002.npy' is not a .npy file"):
    corrupt_and_open('mean-00002.npy', b'')
  index = json.loads(files['index.json'])
  with pytest.raises(data.DataError, match='10 records in shards of 4 need 3 shards, it says 2'):
    corrupt_and_open('index.json', json.dumps(dict(index, num_shards=2)).encode())
  with pytest.raises(data.DataError, match="is not a version-1 lpl_jax.latent_cache index \\(format='other'"):
    corrupt_and_open('index.json', json.dumps(dict(index, format='other')).encode())

  # Every file restored: the cache opens and reads the records it was written with.
  src = data.LatentCacheSource(path)
  for i in range(10):
    rec = src[i]
    np.testing.assert_allclose(rec['latent'], (mean[i] + 0.5) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(rec['latent_std'], std[i] * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(rec['text'], emb[i])
    assert int(rec['label']) == labels[i]
  # Other layouts pass the check too: float16 storage, no std, no text, one exactly full shard.
  mean, *_ = write(tmp_path / 'f16', count=8, store_std=False, text=False, dtype='float16')
  expected = (mean[7].astype(np.float16).astype(np.float32) + 0.5) * 2.0
  np.testing.assert_allclose(data.LatentCacheSource(tmp_path / 'f16')[7]['latent'], expected, rtol=1e-6)
  write(tmp_path / 'one', count=4)
  assert len(data.LatentCacheSource(tmp_path / 'one')) == 4


@pytest.fixture(scope='module')
def small_autoencoder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('small_vae')
  model = ae.AutoencoderKL(SMALL)
  # Random values for the shapes `init_params` would create, drawn on the host: flax's initialisers would cost a
  # 30-second compilation on this CPU for nothing the test needs.
  shapes = jax.eval_shape(lambda k: ae.init_params(model, k), jax.random.key(0))
  rng = np.random.default_rng(7)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
    return (1.0 if name == 'scale' else 0.0) + 0.1 * rng.normal(size=leaf.shape).astype(np.float32)

  ae.save_diffusers(folder, model, jax.tree_util.tree_map_with_path(draw, shapes))
  return str(folder)


def encode_directly(folder, images):
  model, params = ae.from_diffusers(folder)
  mean, logvar = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode))(params, images)
  return model.scale_latents(mean), np.exp(0.5 * logvar) * model.scaling_factor


def embedded_images(num, resolution):
  """The records `encode_to_cache` reads: the image pipeline, unshuffled, with the embedded photographs' random crops
  (the CLI's default for them) and the same seed, in one batch."""
  return next(
    iter(
      data.make_image_pipeline(
        data.EmbeddedSource(num_samples=num),
        resolution=resolution,
        global_batch=num,
        seed=0,
        shuffle=False,
        random_crop=True,
        num_epochs=1,
        process_index=0,
        process_count=1,
      )
    )
  )


def test_encode_to_cache_equals_encoding_on_the_fly(tmp_path, small_autoencoder):
  out = tmp_path / 'cache'
  model, params, random_weights = ae.load_autoencoder(small_autoencoder)
  assert not random_weights
  data.encode_to_cache(
    data.EmbeddedSource(num_samples=10),
    model,
    params,
    str(out),
    resolution=16,
    batch_size=4,
    store_std=True,
    random_crop=True,
    seed=0,
    progress=False,
  )
  src = data.LatentCacheSource(out)
  assert len(src) == 10 and src.latent_shape == (8, 8, 4)
  assert src.index['metadata']['autoencoder_config']['shift_factor'] == 0.1

  images = embedded_images(10, 16)
  expected, expected_std = encode_directly(small_autoencoder, images['images'])
  cached = next(iter(pipeline(src, global_batch=10, sample_posterior=False, resolution=16)))
  np.testing.assert_allclose(cached['latents'], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(cached['labels'], images['labels'])
  np.testing.assert_allclose(np.stack([src[i]['latent_std'] for i in range(10)]), expected_std, rtol=1e-4)


@pytest.fixture(scope='module')
def env():
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


def run_encode(env, *args):
  return subprocess.run(
    [sys.executable, '-m', 'lpl_jax.encode', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


def assert_error(proc, message):
  """Bad input: exit status 2 and one `error: ...` line on stderr naming the problem, no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_encode_argument_errors(tmp_path, small_autoencoder, env):
  with pytest.raises(ValueError, match="autoencoder 'nope' is neither a diffusers autoencoder folder"):
    ae.load_autoencoder('nope')
  model, params = ae.from_diffusers(small_autoencoder)
  src = data.EmbeddedSource(num_samples=4)
  with pytest.raises(ValueError, match="resolution 15 is not a multiple of the autoencoder's downsampling factor 2"):
    data.encode_to_cache(src, model, params, str(tmp_path / 'x'), resolution=15, batch_size=2)
  with pytest.raises(ValueError, match='num_samples=9: the source'):
    data.encode_to_cache(src, model, params, str(tmp_path / 'x'), resolution=16, batch_size=2, num_samples=9)
  assert not os.listdir(tmp_path)
  # The command line: the library's errors and absl's flag errors end the same way.
  assert_error(
    run_encode(env, '--autoencoder=nope', f'--out={tmp_path / "x"}', '--num_samples=4'),
    "autoencoder 'nope' is neither a diffusers autoencoder folder (no such folder exists) nor a preset; "
    'known presets: [',
  )
  assert_error(
    run_encode(env, f'--autoencoder={small_autoencoder}', '--resolution=16'),
    'flag --out=None: Flag --out must have a value other than None.',
  )
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_encode_cli_with_the_tiny_preset_says_weights_are_random(tmp_path, env):
  out = tmp_path / 'tiny'
  proc = run_encode(
    env,
    '--source=embedded',
    '--num_samples=6',
    '--resolution=32',
    '--autoencoder=tiny',
    f'--out={out}',
    '--batch_size=4',
    '--noprogress',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "preset 'tiny' has RANDOM weights" in proc.stdout
  model, params, random_weights = ae.load_autoencoder('tiny', seed=0)
  assert random_weights
  images = embedded_images(6, 32)['images']
  mean, _ = model.apply({'params': params}, images, method=model.encode)
  cached = next(iter(pipeline(data.LatentCacheSource(out), global_batch=6)))['latents']
  np.testing.assert_allclose(cached, model.scale_latents(mean), rtol=1e-4, atol=1e-5)


def test_make_pipeline_dispatches_on_the_source(tmp_path):
  mean, _, labels, _ = write(tmp_path / 'c', count=8, store_std=False, text=False)
  src = data.make_source(f'cache:{tmp_path / "c"}')
  args = dict(resolution=16, global_batch=4, seed=0, shuffle=False, process_index=0, process_count=1)
  batch = next(iter(data.make_pipeline(src, **args)))
  np.testing.assert_allclose(batch['latents'], (mean[:4] + 0.5) * 2.0, rtol=1e-6)  # no std stored: the mean
  np.testing.assert_array_equal(batch['labels'], labels[:4])
  with pytest.raises(ValueError, match='a latent cache holds fixed crops'):
    data.make_pipeline(src, random_flip=True, **args)
  images = next(iter(data.make_pipeline(data.EmbeddedSource(num_samples=8), random_flip=True, **args)))
  assert images['images'].shape == (4, 16, 16, 3)


def test_encode_cli_shards_the_batch_over_devices(tmp_path, small_autoencoder, env):
  """The CLI in a fresh process with 2 host devices writes the cache a 1-device `encode_to_cache` writes (up to float
  error), with its provenance in the index."""
  out1, out2 = tmp_path / 'one', tmp_path / 'two'
  model, params, _ = ae.load_autoencoder(small_autoencoder)
  data.encode_to_cache(
    data.EmbeddedSource(num_samples=6),
    model,
    params,
    str(out1),
    resolution=16,
    batch_size=4,
    random_crop=True,
    seed=0,
    progress=False,
  )
  args = [
    '--source=embedded',
    '--num_samples=6',
    '--resolution=16',
    f'--autoencoder={small_autoencoder}',
    '--batch_size=4',
    '--noprogress',
  ]
  two = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  run = run_encode(two, *args, f'--out={out2}')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'on 2 cpu device(s)' in run.stdout and 'RANDOM' not in run.stdout and f'wrote {out2}' in run.stdout
  meta = data.LatentCacheSource(out2).index['metadata']
  assert meta['num_classes'] == 16 and meta['autoencoder'] == small_autoencoder and meta['random_weights'] is False
  assert meta['source'] == 'embedded' and meta['crop']['random_crop'] and meta['seed'] == 0
  np.testing.assert_allclose(np.load(out2 / 'mean-00000.npy'), np.load(out1 / 'mean-00000.npy'), rtol=1e-5, atol=1e-6)
  assert_error(
    run_encode(two, *args, '--batch_size=3', f'--out={tmp_path / "x"}'),
    'batch_size 3 must be a positive multiple of the 2 local devices',
  )
