"""InceptionV3 for FID, as pytorch-fid computes it: `fid_inception_v3` with its `FIDInceptionA/C/E_1/E_2` patches.

The network is the 2015 TensorFlow Inception graph (`pool_3`, 2048-d) in pytorch-fid's port. It differs from
torchvision's InceptionV3 in three places, all reproduced here: the average pools of the A, C and E blocks do not
count the zero padding (`count_include_pad=False`), and the last E block (`Mixed_7c`) pools with a max instead of an
average. Batch norms use eps=1e-3. The 1008-class `fc` layer is part of the weights file and of the parameters (so
import is strict), but FID uses the pool features only.

Preprocessing follows pytorch-fid's `InceptionV3` wrapper with `resize_input=True, normalize_input=True`: images in
[0, 1] (uint8 is divided by 255 first, as `ToTensor` does) are resized to 299x299 with `F.interpolate(...,
mode='bilinear', align_corners=False)` (no antialiasing, also when downsampling) and mapped to [-1, 1].

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch state dict; reading it needs torch), or the
same tensors exported to `.npz` / `.safetensors` under the same names (`convert_weights` writes one; no torch needed
to read it). Nothing is downloaded. Layouts in JAX are NHWC.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpl_jax import weights

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
WEIGHTS_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else v


class FrozenBatchNorm(nn.Module):
  """Inference batch norm with its running statistics stored as parameters (the network is never trained)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    mean = self.param('mean', nn.initializers.zeros, (c,))
    var = self.param('var', nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv2d(nn.Module):
  """torchvision's `BasicConv2d`: conv without bias -> batch norm (eps 1e-3) -> ReLU."""

  features: int
  kernel_size: int | tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel_size),
      strides=_pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=self.precision,
      name='conv',
    )(x)
    return nn.relu(FrozenBatchNorm(name='bn')(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # FID patch: TensorFlow's average pool ignores the padded zeros.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class FIDInceptionA(nn.Module):
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(64, 1, name='branch1x1')(x)
    b5 = conv(64, 5, padding=2, name='branch5x5_2')(conv(48, 1, name='branch5x5_1')(x))
    b3 = conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_3')(conv(96, 3, padding=1, name='branch3x3dbl_2')(b3))
    bp = conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(384, 3, strides=2, name='branch3x3')(x)
    bd = conv(96, 3, padding=1, name='branch3x3dbl_2')(conv(64, 1, name='branch3x3dbl_1')(x))
    bd = conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name='branch1x1')(x)
    b7 = conv(c7, 1, name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(320, 3, strides=2, name='branch3x3_2')(conv(192, 1, name='branch3x3_1')(x))
    b7 = conv(192, 1, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """`FIDInceptionE_1` (average pool without padding) or, with `max_pool=True`, `FIDInceptionE_2` (max pool)."""

  max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(320, 1, name='branch1x1')(x)
    b3 = conv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = conv(384, 3, padding=1, name='branch3x3dbl_2')(conv(448, 1, name='branch3x3dbl_1')(x))
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    if self.max_pool:
      # FID patch (`FIDInceptionE_2`): the TF graph max-pools here where the paper's network averages.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` weights of PyTorch's 1-D linear interpolation with `align_corners=False` and no antialiasing.

  Source positions and weights are computed in float32 like PyTorch's CPU kernel (float64 positions would move the
  result by up to ~5e-5 of the pixel range when downsampling).
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0.0))  # clamped at 0
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(f32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), i0), f32(1.0) - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE, *, precision: Any = jax.lax.Precision.HIGHEST):
  """`F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)` on `[B, H, W, C]` images.

  Separable: two small interpolation matrices built on the host (the operation is linear), applied with einsum.
  """
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images
  mh, mw = jnp.asarray(_bilinear_matrix(h, size)), jnp.asarray(_bilinear_matrix(w, size))
  return jnp.einsum('ph,qw,bhwc->bpqc', mh, mw, images, precision=precision)


def preprocess(images: jax.Array) -> jax.Array:
  """pytorch-fid's input pipeline: `[B, H, W, 3]` uint8 or float in [0, 1] -> `[B, 299, 299, 3]` float32 in [-1, 1]."""
  chex.assert_rank(images, 4)
  if images.shape[-1] != 3:
    raise ValueError(f'Inception expects RGB images [B, H, W, 3]; got shape {images.shape}.')
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return 2.0 * resize_bilinear(x) - 1.0


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `InceptionV3([3])` (FID weights): images -> `[B, 2048]` pool3 features.

  Attributes:
    precision: matmul/conv precision. `HIGHEST` by default so TPU/GPU features match float32 references.
  """

  precision: Any = jax.lax.Precision.HIGHEST

  def setup(self):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    p = dict(precision=self.precision)
    self.Conv2d_1a_3x3 = conv(32, 3, strides=2)
    self.Conv2d_2a_3x3 = conv(32, 3)
    self.Conv2d_2b_3x3 = conv(64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(80, 1)
    self.Conv2d_4a_3x3 = conv(192, 3)
    self.Mixed_5b = FIDInceptionA(32, **p)
    self.Mixed_5c = FIDInceptionA(64, **p)
    self.Mixed_5d = FIDInceptionA(64, **p)
    self.Mixed_6a = InceptionB(**p)
    self.Mixed_6b = FIDInceptionC(128, **p)
    self.Mixed_6c = FIDInceptionC(160, **p)
    self.Mixed_6d = FIDInceptionC(160, **p)
    self.Mixed_6e = FIDInceptionC(192, **p)
    self.Mixed_7a = InceptionD(**p)
    self.Mixed_7b = FIDInceptionE(max_pool=False, **p)
    self.Mixed_7c = FIDInceptionE(max_pool=True, **p)
    self.fc = nn.Dense(NUM_CLASSES, precision=self.precision)

  def __call__(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` uint8, or float in [0, 1] -> `[B, 2048]` float32 pool3 features."""
    x = preprocess(images)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3_s2(x)
    x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
      self.Mixed_6d,
      self.Mixed_6e,
      self.Mixed_7a,
      self.Mixed_7b,
      self.Mixed_7c,
    ):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def logits(self, images: jax.Array) -> jax.Array:
    """`[B, 1008]` class logits of the 2015 graph (not used by FID; dropout is off at inference)."""
    return self.fc(self(images))


def fid_features(params: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """`[B, H, W, 3]` uint8 (or float in [0, 1]) -> `[B, 2048]` FID features; the `apply_fn` of `extract_features`."""
  return FIDInceptionV3().apply({'params': params}, images)


def init_params(model: FIDInceptionV3, rng: jax.Array) -> dict:
  """Random parameters (for shapes and tests; FID needs the imported weights)."""
  x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return model.init(rng, x, method=model.logits)['params']


# -------------------------------------------------------------------------------------------------------------------
# Weight import.

_BN_LEAVES = {'running_mean': 'mean', 'running_var': 'var'}  # batch-norm statistics are parameters here
_IGNORED_SUFFIX = '.num_batches_tracked'  # a training counter in newer torch state dicts, not a weight
_NO_TORCH_HINT = (
  'Either install torch, or convert the file once where torch is available with '
  'lpl_jax.eval.convert_weights(src, dst.npz) and pass the .npz.'
)


def _torch_name(path: weights.Path) -> str:
  # Module names such as `branch7x7_1` end in digits without being list entries.
  return weights.path_to_torch_name(path, leaves=_BN_LEAVES, numbered=False)


@functools.cache
def _expected_shapes() -> dict[weights.Path, tuple[int, ...]]:
  return weights.expected_shapes(lambda: init_params(FIDInceptionV3(), jax.random.key(0)))


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """pytorch-fid Inception state dict (name -> array, PyTorch layouts) -> Flax params, strictly checked.

  Raises:
    WeightsMismatchError: naming every missing, unexpected, mis-shaped and non-floating-point tensor.
  """
  tensors = (
    (
      name,
      weights.torch_name_to_path(name, np.ndim(array), leaves=_BN_LEAVES),
      weights.torch_to_flax(np.asarray(array)),
    )
    for name, array in state_dict.items()
    if not name.endswith(_IGNORED_SUFFIX)
  )
  converted = weights.match_params(
    tensors,
    _expected_shapes(),
    model='FID Inception',
    name_of=_torch_name,
    target="pytorch-fid's FID InceptionV3 (fid_inception_v3)",
  )
  return flax.traverse_util.unflatten_dict({p: jnp.asarray(v, jnp.float32) for p, v in converted.items()})


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params -> pytorch-fid state dict (names and layouts of `fid_inception_v3().state_dict()`), float32."""
  return {
    _torch_name(path): np.ascontiguousarray(weights.flax_to_torch(np.asarray(v, np.float32)))
    for path, v in flax.traverse_util.flatten_dict(params).items()
  }


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a weights file: `.pth`/`.pt` (torch state dict, needs torch), `.npz` or `.safetensors`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Inception weights file {path!r} does not exist. FID uses pytorch-fid's {WEIGHTS_FILENAME} (or its .npz "
      'export); nothing is downloaded by this library, see docs/eval.md for how to get the file.'
    )
  return weights.read_tensors(path, no_torch_hint=_NO_TORCH_HINT)


def load_inception(
  path: str | os.PathLike, *, precision: Any = jax.lax.Precision.HIGHEST
) -> tuple[FIDInceptionV3, dict]:
  """Loads pytorch-fid's FID Inception weights.

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (torch state dict), or an `.npz` / `.safetensors` file holding the
      same tensors under the same names (see `convert_weights`).
    precision: conv/matmul precision of the returned module.

  Returns:
    `(model, params)`; features are `model.apply({'params': params}, images)`, `[B, 2048]`.
  """
  return FIDInceptionV3(precision=precision), convert_state_dict(read_state_dict(path))


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Checks the weights in `src` and writes them to `dst` (`.npz` or `.safetensors`) so torch is not needed later."""
  state = params_to_state_dict(convert_state_dict(read_state_dict(src)))
  dst = os.fspath(dst)
  tmp = dst + '.tmp'
  if dst.endswith('.npz'):
    with open(tmp, 'wb') as f:
      np.savez(f, **state)
  elif dst.endswith('.safetensors'):
    from safetensors.numpy import save_file

    save_file(state, tmp)
  else:
    raise ValueError(f'{dst!r}: write the weights as .npz or .safetensors.')
  os.replace(tmp, dst)
