"""Images from a denoiser and an autoencoder: a compiled sampler from pure noise followed by the decoder, and the
batching that produces any number of images with one compiled shape.

The denoiser is a Flax module called as `model.apply({'params': p}, x, t, y, **text)`; the autoencoder has
`unscale_latents` and `decode` (`lpl_jax.autoencoder.AutoencoderKL`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lpl_jax.diffusion.formulations import Formulation
from lpl_jax.diffusion.samplers import sample

GenerateFn = Callable[[Any, Any, jax.Array, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How to sample: the sampler (`SAMPLERS`), its steps, the classifier-free guidance scale, DDIM's eta, the time
  shift of flow samplers, and the timestep grid of the DDPM samplers (diffusers' `timestep_spacing`: a model trained
  with zero-terminal SNR needs `'trailing'`, whose first step is the last timestep, where the SNR is 0)."""

  sampler: str = 'ddim'
  steps: int = 50
  guidance: float = 1.5
  eta: float = 0.0
  shift: float = 1.0
  spacing: str = 'leading'


def to_uint8(images: jax.Array) -> jax.Array:
  """`[-1, 1]` images -> uint8."""
  return jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8)


def make_generate_fn(
  model: Any,
  ae_model: Any,
  form: Formulation,
  *,
  latent_shape: tuple[int, int, int],
  settings: SamplerSettings,
  null_class: int,
  sharding: Any = None,
) -> GenerateFn:
  """`(params, ae_params, key, cond) -> uint8 images [N, H, W, 3]`, jitted.

  Args:
    model, ae_model: the denoiser and the autoencoder (see the module docstring).
    latent_shape: `(h, w, c)` of one latent.
    null_class: the unconditional label of a class-conditional model (classifier-free guidance).
    sharding: of the `[N, ...]` starting noise (e.g. rows over all devices), or None.

  `cond` is `{'labels': [N]}`, or `{'context': [N, L, D]}` (optionally `'pooled': [N, P]`) for text models, whose
  null condition is zero embeddings.
  """

  def fn(params, ae_params, key, cond):
    noise_key, key = jax.random.split(key)
    if 'labels' in cond:
      y, null = cond['labels'], null_class

      def model_fn(x, t, y):
        return model.apply({'params': params}, x, t, y)
    else:  # text: y indexes the rows of cond, -1 (the guidance's null row) gives zero embeddings
      y, null = jnp.arange(cond['context'].shape[0]), -1

      def model_fn(x, t, y):
        text = {
          k: jnp.where((y >= 0).reshape((-1,) + (1,) * (v.ndim - 1)), v[jnp.clip(y, 0)], 0) for k, v in cond.items()
        }
        return model.apply({'params': params}, x, t, None, **text)

    x_init = jax.random.normal(noise_key, (y.shape[0], *latent_shape))
    if sharding is not None:
      x_init = jax.lax.with_sharding_constraint(x_init, sharding)
    z = sample(
      model_fn,
      form,
      x_init,
      key,
      sampler=settings.sampler,
      num_steps=settings.steps,
      eta=settings.eta,
      guidance_scale=settings.guidance,
      y=y,
      null_class=null,
      shift=settings.shift,
      timestep_spacing=settings.spacing,
    )
    images = ae_model.apply({'params': ae_params}, ae_model.unscale_latents(z), method=ae_model.decode)
    return to_uint8(images)

  return jax.jit(fn)


def padded_batches(cond: Mapping[str, np.ndarray], batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """`(rows, batch)` over the rows of `cond`: each batch has `batch_size` rows, the last one filled up with copies of
  its last row (to be dropped after sampling), so that one compiled shape serves every call."""
  num = len(next(iter(cond.values())))
  for start in range(0, num, batch_size):
    n = min(batch_size, num - start)
    yield (
      n,
      {
        k: np.concatenate([v[start : start + n], np.repeat(v[start + n - 1 : start + n], batch_size - n, 0)])
        for k, v in cond.items()
      },
    )


def generate(
  fn: GenerateFn,
  params: Any,
  ae_params: Any,
  cond: Mapping[str, np.ndarray],
  *,
  batch_size: int,
  seed: int,
  place: Callable[[np.ndarray], jax.Array] = jnp.asarray,
  gather: Callable[[jax.Array], np.ndarray] = np.asarray,
  progress: bool = False,
) -> np.ndarray:
  """uint8 images `[N, H, W, 3]` for the N rows of `cond`, batch `i` sampled with `fold_in(key(seed), i)`.

  Args:
    place: host rows -> device array (e.g. sharded over the mesh).
    gather: device images -> host array (on several processes it must gather every process's rows).
  """
  num = len(next(iter(cond.values())))
  out = []
  batches = padded_batches(cond, batch_size)
  for i, (n, batch) in enumerate(tqdm(batches, total=-(-num // batch_size), desc='sample', disable=not progress)):
    images = fn(params, ae_params, jax.random.fold_in(jax.random.key(seed), i), {k: place(v) for k, v in batch.items()})
    out.append(gather(images)[:n])
  return np.concatenate(out)
