"""A pytorch-fid Inception with random weights, saved with torch.save as the loader's input, built once."""

import numpy as np
import pytest


@pytest.fixture(scope='session')
def random_inception(tmp_path_factory):
  """`(path of the .pth state dict, pytorch-fid's InceptionV3([3]) holding the same weights)`."""
  import torch

  from tests.eval import torch_fid

  state = torch_fid.fid_inception_v3_random(seed=0)
  path = tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth'
  torch.save(state, path)
  with pytest.MonkeyPatch.context() as mp:
    model = torch_fid.pytorch_fid_model(state, mp)
  return str(path), model


def torch_fid_features(model, images: np.ndarray) -> np.ndarray:
  """pytorch-fid's feature pipeline: uint8 NHWC -> ToTensor-style [0, 1] NCHW -> InceptionV3 -> [N, 2048]."""
  import torch

  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0
  with torch.no_grad():
    return model(x)[0][:, :, 0, 0].numpy().astype(np.float64)
