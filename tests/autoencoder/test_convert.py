"""Weight import from diffusers folders: strictness and clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lpl_jax import autoencoder as ae
from lpl_jax.autoencoder.convert import path_to_torch_name, torch_name_to_path

WEIGHTS = 'diffusion_pytorch_model.safetensors'


@pytest.fixture
def kl_copy(diffusers_folder, tmp_path):
  """A writable copy of the small diffusers AutoencoderKL folder and its state dict."""
  folder, _ = diffusers_folder('kl')
  for name in os.listdir(folder):
    shutil.copy(os.path.join(folder, name), tmp_path / name)
  return tmp_path, load_file(str(tmp_path / WEIGHTS))


def test_loads_save_pretrained_folder(kl_copy):
  folder, state = kl_copy
  model, params = ae.from_diffusers(folder)
  assert model.config.block_out_channels == (32, 64, 64)
  assert model.config.norm_num_groups == 8
  n_params = sum(np.prod(v.shape) for v in state.values())
  import jax

  assert sum(x.size for x in jax.tree.leaves(params)) == n_params


def test_missing_folder_and_files(tmp_path, kl_copy):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ae.from_diffusers(tmp_path / 'nowhere')
  folder, _ = kl_copy
  os.remove(folder / WEIGHTS)
  with pytest.raises(FileNotFoundError, match=f'no weights in .*expected {WEIGHTS}'):
    ae.from_diffusers(folder)
  (folder / 'diffusion_pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='.bin weights are not read'):
    ae.from_diffusers(folder)
  os.remove(folder / 'config.json')
  with pytest.raises(FileNotFoundError, match=r"config.json' is missing"):
    ae.from_diffusers(folder)


def test_every_problem_is_named(kl_copy):
  folder, state = kl_copy
  del state['decoder.up_blocks.1.resnets.0.norm2.bias']
  del state['encoder.conv_in.weight']
  state['decoder.extra_layer.weight'] = np.zeros((3, 3), np.float32)
  state['decoder.conv_out.weight'] = np.zeros((3, 32, 1, 1), np.float32)
  save_file(state, str(folder / WEIGHTS))
  with pytest.raises(ae.WeightsMismatchError) as info:
    ae.from_diffusers(folder)
  message = str(info.value)
  assert '2 missing' in message and '1 unexpected' in message and '1 mis-shaped' in message
  for name in ('decoder.up_blocks.1.resnets.0.norm2.bias', 'encoder.conv_in.weight', 'decoder.extra_layer.weight'):
    assert name in message
  assert 'decoder.conv_out.weight: file has (3, 32, 1, 1), model expects (3, 32, 3, 3)' in message


def test_transposed_linear_is_a_shape_error_only_when_not_square(kl_copy):
  """A non-square tensor in the wrong layout is rejected; square attention kernels are left to the parity tests."""
  folder, state = kl_copy
  state['encoder.conv_in.weight'] = np.ascontiguousarray(np.transpose(state['encoder.conv_in.weight'], (1, 0, 2, 3)))
  save_file(state, str(folder / WEIGHTS))
  with pytest.raises(ae.WeightsMismatchError, match=r'encoder.conv_in.weight: file has \(3, 32, 3, 3\)'):
    ae.from_diffusers(folder)


def test_both_attention_names_for_one_tensor_is_an_error(kl_copy):
  folder, state = kl_copy
  state['decoder.mid_block.attentions.0.query.weight'] = state['decoder.mid_block.attentions.0.to_q.weight']
  save_file(state, str(folder / WEIGHTS))
  with pytest.raises(ae.WeightsMismatchError, match='given twice'):
    ae.from_diffusers(folder)


def test_config_errors(kl_copy):
  folder, _ = kl_copy
  cfg = json.loads((folder / 'config.json').read_text())
  for change, pattern in (
    ({'_class_name': 'VQModel'}, "describes a 'VQModel'"),
    ({'norm_type': 'spatial'}, r"does not know: \['norm_type'\]"),
    ({'act_fn': 'gelu'}, 'only "silu"'),
    ({'up_block_types': ['AttnUpDecoderBlock2D'] * 3}, "only 'UpDecoderBlock2D'"),
    ({'down_block_types': ['DownEncoderBlock2D'] * 2}, 'lists 2 down_block_types but 3 block widths'),
    ({'latent_channels': 8}, 'mis-shaped'),
  ):
    (folder / 'config.json').write_text(json.dumps(cfg | change))
    with pytest.raises(ValueError, match=pattern):
      ae.from_diffusers(folder)
  (folder / 'config.json').write_text('{not json')
  with pytest.raises(ValueError, match='not valid JSON'):
    ae.from_diffusers(folder)


def test_bf16_safetensors_are_read(kl_copy, tmp_path):
  """Published checkpoints are often half precision; values are widened to float32."""
  import torch
  from safetensors.torch import save_file as save_torch

  folder, state = kl_copy
  half = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
  save_torch(half, str(folder / 'diffusion_pytorch_model.bf16.safetensors'))
  _, params = ae.from_diffusers(folder, variant='bf16')
  kernel = np.asarray(params['decoder']['conv_in']['kernel'])
  expected = np.transpose(half['decoder.conv_in.weight'].float().numpy(), (2, 3, 1, 0))
  np.testing.assert_array_equal(kernel, expected)


@pytest.mark.parametrize(
  'name,ndim,path',
  [
    ('decoder.up_blocks.0.resnets.1.conv1.weight', 4, ('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel')),
    ('decoder.mid_block.attentions.0.to_out.0.bias', 1, ('decoder', 'mid_block', 'attentions_0', 'to_out_0', 'bias')),
    (
      'encoder.mid_block.attentions.0.proj_attn.weight',
      2,
      ('encoder', 'mid_block', 'attentions_0', 'to_out_0', 'kernel'),
    ),
    ('decoder.conv_norm_out.weight', 1, ('decoder', 'conv_norm_out', 'scale')),
  ],
)
def test_name_mapping(name, ndim, path):
  assert torch_name_to_path(name, ndim) == path
  assert path_to_torch_name(path) == name.replace('proj_attn', 'to_out.0')


def test_truncated_or_foreign_weights_file(kl_copy):
  folder, _ = kl_copy
  raw = (folder / WEIGHTS).read_bytes()
  (folder / WEIGHTS).write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match='inconsistent offsets'):
    ae.from_diffusers(folder)
  (folder / WEIGHTS).write_bytes(b'PK\x03\x04 this is a zip file')
  with pytest.raises(ValueError, match='is not a safetensors file'):
    ae.from_diffusers(folder)


def test_fp16_safetensors_match_safetensors_own_reader(kl_copy):
  from safetensors.numpy import load_file as load_np

  from lpl_jax.weights import read_safetensors

  folder, state = kl_copy
  save_file({k: v.astype(np.float16) for k, v in state.items()}, str(folder / 'half.safetensors'))
  ours, theirs = read_safetensors(str(folder / 'half.safetensors')), load_np(str(folder / 'half.safetensors'))
  assert ours.keys() == theirs.keys()
  for k in ours:
    assert ours[k].dtype == np.float32
    np.testing.assert_array_equal(ours[k], theirs[k].astype(np.float32))
