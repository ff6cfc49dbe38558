"""pytorch-fid's own FID InceptionV3 with random weights (no download), and its state dict saved with torch.save."""

import numpy as np
import torch
import torchvision
from pytorch_fid import inception as pfi


def fid_inception_v3_random(seed: int) -> dict[str, torch.Tensor]:
  """A state dict of `pytorch_fid.inception.fid_inception_v3()`'s network, with random weights and BN statistics.

  The network is assembled exactly as `fid_inception_v3` does (torchvision's Inception3 with 1008 classes, no aux
  logits, and pytorch-fid's FIDInceptionA/C/E_1/E_2 blocks); only the download of the trained weights is skipped.
  """
  net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  gen = torch.Generator().manual_seed(seed)
  state = {}
  for name, t in net.state_dict().items():
    if name.endswith('num_batches_tracked'):
      state[name] = t.clone()
    elif name.endswith('running_var'):
      state[name] = 0.5 + torch.rand(t.shape, generator=gen)
    elif name.endswith('running_mean') or name.endswith('bn.bias') or name == 'fc.bias':
      state[name] = 0.1 * torch.randn(t.shape, generator=gen)
    elif name.endswith('bn.weight'):
      state[name] = 1.0 + 0.2 * torch.randn(t.shape, generator=gen)
    else:  # conv / fc weights, He-scaled so activations neither vanish nor explode over ~95 layers
      fan_in = int(np.prod(t.shape[1:]))
      state[name] = torch.randn(t.shape, generator=gen) * np.sqrt(2.0 / fan_in)
  return state


def pytorch_fid_model(state: dict[str, torch.Tensor], monkeypatch) -> pfi.InceptionV3:
  """pytorch-fid's `InceptionV3([3])` (the FID feature extractor: resize, normalise, pool3), loading `state` where
  it would download the trained weights."""
  monkeypatch.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: state)
  model = pfi.InceptionV3(
    [pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True, use_fid_inception=True
  )
  return model.eval()
