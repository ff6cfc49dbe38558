"""PyTorch-layout weights into Flax parameters: file readers, name and layout mappings, strict checking.

Shared by every importer (the diffusers autoencoder, pytorch-fid's Inception); depends on nothing else in lpl_jax.
An importer reads a file (`read_tensors`), maps each tensor to a parameter path and the Flax layout
(`torch_name_to_path`, `torch_to_flax`, or its own rules), and passes the result to `match_params`, which either
returns the flat parameters or raises one `WeightsMismatchError` naming every problem.
"""

from lpl_jax.weights.files import (
  find_safetensors,
  is_float,
  read_npz,
  read_safetensors,
  read_safetensors_folder,
  read_tensors,
  read_torch_state_dict,
)
from lpl_jax.weights.layout import (
  Path,
  flax_to_torch,
  path_to_torch_name,
  torch_name_to_path,
  torch_shape,
  torch_to_flax,
)
from lpl_jax.weights.strict import WeightsMismatchError, expected_shapes, match_params

__all__ = [
  'Path',
  'WeightsMismatchError',
  'expected_shapes',
  'find_safetensors',
  'flax_to_torch',
  'is_float',
  'match_params',
  'path_to_torch_name',
  'read_npz',
  'read_safetensors',
  'read_safetensors_folder',
  'read_tensors',
  'read_torch_state_dict',
  'torch_name_to_path',
  'torch_shape',
  'torch_to_flax',
]
