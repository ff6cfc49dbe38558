"""Data: image sources, grain pipelines (sharded, deterministic, checkpointable) and the latent cache (written by
`encode_to_cache`)."""

from lpl_jax.data.cache import LatentCacheSource, LatentCacheWriter, read_index
from lpl_jax.data.encode import encode_to_cache
from lpl_jax.data.errors import DataError
from lpl_jax.data.pipeline import (
  image_stream,
  iterator_state_from_bytes,
  iterator_state_to_bytes,
  make_image_pipeline,
  make_latent_pipeline,
  make_pipeline,
  steps_per_epoch,
)
from lpl_jax.data.sources import EMBEDDED_PHOTOS, EmbeddedSource, ImageFolderSource, TfdsSource, make_source
from lpl_jax.data.transforms import CropConfig

__all__ = [
  'EMBEDDED_PHOTOS',
  'CropConfig',
  'DataError',
  'EmbeddedSource',
  'ImageFolderSource',
  'LatentCacheSource',
  'LatentCacheWriter',
  'TfdsSource',
  'encode_to_cache',
  'image_stream',
  'iterator_state_from_bytes',
  'iterator_state_to_bytes',
  'make_image_pipeline',
  'make_latent_pipeline',
  'make_pipeline',
  'make_source',
  'read_index',
  'steps_per_epoch',
]
