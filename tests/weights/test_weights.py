"""The shared weights machinery: one error class, the strict check, names and layouts, and the file readers against
safetensors' and torch's own."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lpl_jax import autoencoder as ae
from lpl_jax import eval as lpl_eval
from lpl_jax import weights


def test_one_error_class_for_every_importer():
  assert ae.WeightsMismatchError is weights.WeightsMismatchError
  assert lpl_eval.WeightsMismatchError is weights.WeightsMismatchError
  assert issubclass(weights.WeightsMismatchError, ValueError)


EXPECTED = {
  ('conv', 'kernel'): (3, 3, 4, 8),
  ('conv', 'bias'): (8,),
  ('norm', 'scale'): (8,),
  ('dense', 'kernel'): (8, 2),
}


def _entries(state):
  return [(name, weights.torch_name_to_path(name, a.ndim), weights.torch_to_flax(a)) for name, a in state.items()]


def _state():
  rng = np.random.default_rng(0)
  return {
    'conv.weight': rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
    'conv.bias': np.zeros(8, np.float32),
    'norm.weight': np.ones(8, np.float32),
    'dense.weight': rng.normal(size=(2, 8)).astype(np.float32),
  }


def test_match_params_returns_every_expected_path():
  state = _state()
  params = weights.match_params(_entries(state), EXPECTED, target='the test model')
  assert params.keys() == EXPECTED.keys()
  np.testing.assert_array_equal(params[('conv', 'kernel')], state['conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params[('dense', 'kernel')], state['dense.weight'].T)


def test_match_params_names_every_problem_in_one_error():
  state = _state()
  del state['conv.bias']  # missing
  state['extra.weight'] = np.zeros((5, 6), np.float32)  # unexpected
  state['dense.weight'] = np.zeros((3, 8), np.float32)  # mis-shaped
  state['norm.weight'] = np.ones(8, np.int64)  # not floating point
  entries = _entries(state) + [('conv.weight_copy', ('conv', 'kernel'), weights.torch_to_flax(state['conv.weight']))]
  with pytest.raises(weights.WeightsMismatchError) as info:
    weights.match_params(entries, EXPECTED, target='the test model', model='TestNet')
  assert str(info.value) == (
    'weights do not match the test model:\n'
    '  1 missing tensor(s):\n    conv.bias (8,)\n'
    '  1 unexpected tensor(s):\n    extra.weight (5, 6)\n'
    '  1 mis-shaped tensor(s):\n    dense.weight: file has (3, 8), TestNet expects (2, 8)\n'
    '  1 non-floating-point tensor(s):\n    norm.weight: dtype int64, expected floating point\n'
    '  1 given twice tensor(s):\n    conv.weight_copy (same tensor as conv.weight)'
  )


def test_match_params_accepts_bfloat16_as_floating_point():
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _state().items()}
  params = weights.match_params(_entries(state), EXPECTED, target='the test model')
  assert params[('norm', 'scale')].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize(
  'name,ndim,path,leaves,numbered',
  [
    (
      'decoder.up_blocks.0.resnets.1.conv1.weight',
      4,
      ('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel'),
      None,
      True,
    ),
    ('transformer_blocks.12.ff.net.2.weight', 2, ('transformer_blocks_12', 'ff', 'net_2', 'kernel'), None, True),
    ('norm_out.weight', 1, ('norm_out', 'scale'), None, True),
    (
      'Mixed_6b.branch7x7_1.bn.running_var',
      1,
      ('Mixed_6b', 'branch7x7_1', 'bn', 'var'),
      {'running_mean': 'mean', 'running_var': 'var'},
      False,
    ),
  ],
)
def test_names_round_trip(name, ndim, path, leaves, numbered):
  assert weights.torch_name_to_path(name, ndim, leaves=leaves) == path
  assert weights.path_to_torch_name(path, leaves=leaves, numbered=numbered) == name


def test_layouts_are_torch_conv_and_linear_layouts():
  """A conv through `lax.conv_general_dilated` with the converted kernel equals torch's conv2d; the same for linear."""
  import jax
  import torch

  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 4, 7, 5)).astype(np.float32)  # NCHW
  w = rng.normal(size=(6, 4, 3, 2)).astype(np.float32)  # [O, I, kh, kw]
  expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy().transpose(0, 2, 3, 1)
  kernel = weights.torch_to_flax(w)
  assert kernel.shape == (3, 2, 4, 6) and weights.torch_shape(kernel.shape) == w.shape
  out = jax.lax.conv_general_dilated(
    x.transpose(0, 2, 3, 1), kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  lin = rng.normal(size=(3, 5)).astype(np.float32)  # [O, I]
  v = rng.normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_allclose(
    v @ weights.torch_to_flax(lin),
    torch.nn.functional.linear(torch.from_numpy(v), torch.from_numpy(lin)).numpy(),
    rtol=1e-5,
    atol=1e-5,
  )
  for a in (w, lin, np.zeros(3)):
    np.testing.assert_array_equal(weights.flax_to_torch(weights.torch_to_flax(a)), a)


def test_read_safetensors_matches_safetensors_own_reader(tmp_path):
  rng = np.random.default_rng(2)
  state = {
    'f64': rng.normal(size=(2, 3)),
    'f16': rng.normal(size=(4,)).astype(np.float16),
    'i64': np.arange(5, dtype=np.int64),
    'u8': np.arange(6, dtype=np.uint8).reshape(2, 3),
    'b': np.array([True, False]),
    'scalar': np.array(1.5, np.float32),
  }
  save_file(state, str(tmp_path / 'w.safetensors'), metadata={'format': 'np'})
  theirs = load_file(str(tmp_path / 'w.safetensors'))
  kept = weights.read_safetensors(tmp_path / 'w.safetensors', float_dtype=None)
  widened = weights.read_safetensors(tmp_path / 'w.safetensors')
  assert kept.keys() == widened.keys() == theirs.keys()
  for k in theirs:
    assert kept[k].dtype == theirs[k].dtype and kept[k].shape == theirs[k].shape, k
    np.testing.assert_array_equal(kept[k], theirs[k])
    assert widened[k].dtype == (np.float32 if theirs[k].dtype.kind == 'f' else theirs[k].dtype), k
    np.testing.assert_array_equal(widened[k], theirs[k].astype(widened[k].dtype))
  kept['i64'][0] = 7  # the arrays own their memory


def test_bfloat16_is_read_bit_exactly_from_safetensors_and_torch(tmp_path):
  import torch
  from safetensors.torch import save_file as save_torch

  t = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
  save_torch({'w': t}, str(tmp_path / 'w.safetensors'))
  torch.save({'w': t, 'n': torch.tensor(3)}, tmp_path / 'w.pt')
  bits = t.view(torch.int16).numpy()
  for path in (tmp_path / 'w.safetensors', tmp_path / 'w.pt'):
    kept = weights.read_tensors(path, float_dtype=None)['w']
    assert kept.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kept.view(np.int16), bits)
    np.testing.assert_array_equal(weights.read_tensors(path)['w'], t.float().numpy())
  assert weights.read_tensors(tmp_path / 'w.pt')['n'].dtype == np.int64


def test_read_safetensors_refuses_broken_files(tmp_path):
  save_file({'a': np.zeros((4, 4), np.float32)}, str(tmp_path / 'w.safetensors'))
  raw = (tmp_path / 'w.safetensors').read_bytes()
  (tmp_path / 'w.safetensors').write_bytes(raw[:-8])
  with pytest.raises(ValueError, match='tensor a has inconsistent offsets'):
    weights.read_safetensors(tmp_path / 'w.safetensors')
  for junk in (b'PK\x03\x04 a zip file', b'abc', len(b'[1]').to_bytes(8, 'little') + b'[1]'):
    (tmp_path / 'w.safetensors').write_bytes(junk)
    with pytest.raises(ValueError, match='is not a safetensors file'):
      weights.read_safetensors(tmp_path / 'w.safetensors')
  header = json.dumps({'a': {'dtype': 'C64', 'shape': [1], 'data_offsets': [0, 8]}}).encode()
  (tmp_path / 'w.safetensors').write_bytes(len(header).to_bytes(8, 'little') + header + bytes(8))
  with pytest.raises(ValueError, match='tensor a has dtype C64, which this reader does not know'):
    weights.read_safetensors(tmp_path / 'w.safetensors')


def test_read_sharded_folder(tmp_path):
  name = 'diffusion_pytorch_model.safetensors'
  save_file({'a': np.ones(2, np.float32)}, str(tmp_path / 'model-00001-of-00002.safetensors'))
  save_file({'b': np.zeros(3, np.float16)}, str(tmp_path / 'model-00002-of-00002.safetensors'))
  index = {'weight_map': {'a': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}}
  (tmp_path / f'{name}.index.json').write_text(json.dumps(index))
  state = weights.read_safetensors_folder(tmp_path, name)
  assert sorted(state) == ['a', 'b'] and state['b'].dtype == np.float32
  (tmp_path / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002.safetensors.* listed in the index is missing'):
    weights.read_safetensors_folder(tmp_path, name)
  with pytest.raises(FileNotFoundError, match=r'expected diffusion_pytorch_model.fp16.safetensors \(or'):
    weights.read_safetensors_folder(tmp_path, name, variant='fp16')


def test_read_tensors_dispatches_on_the_extension(tmp_path):
  import torch

  state = {'a': np.arange(6, dtype=np.float16).reshape(2, 3), 'n': np.array(4, np.int64)}
  np.savez(tmp_path / 'w.npz', **state)
  save_file(state, str(tmp_path / 'w.safetensors'))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / 'w.pth')
  for ext in ('npz', 'safetensors', 'pth'):
    got = weights.read_tensors(tmp_path / f'w.{ext}')
    assert got['a'].dtype == np.float32 and got['n'].dtype == np.int64, ext
    np.testing.assert_array_equal(got['a'], state['a'].astype(np.float32))
  with pytest.raises(FileNotFoundError, match="weights file '.*nowhere.npz' does not exist"):
    weights.read_tensors(tmp_path / 'nowhere.npz')
  (tmp_path / 'w.ckpt').write_bytes(b'')
  with pytest.raises(ValueError, match="unknown weights format '.ckpt'"):
    weights.read_tensors(tmp_path / 'w.ckpt')
  torch.save({'model': {'a': torch.zeros(2)}, 'step': 3}, tmp_path / 'train.pt')
  with pytest.raises(ValueError, match=r'not a flat state dict \(name -> tensor\): model \(dict\), step \(int\)'):
    weights.read_tensors(tmp_path / 'train.pt')
