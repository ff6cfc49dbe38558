"""The latent perceptual loss (Berrada et al., ICLR 2025): outlier masks, normalisation, weighting, presets.

Entry points: `LPLConfig.from_preset('paper' | 'reference', **overrides)`, `make_features_fn(model, params, cfg)`
and `lpl_loss(features_fn, z0_hat, z0, cfg) -> (loss [B], aux)`. See docs/lpl.md.
"""

from lpl_jax.lpl.config import PRESETS, LPLConfig
from lpl_jax.lpl.loss import (
  FeaturesFn,
  gate_weights,
  layer_masks,
  lpl_loss,
  make_features_fn,
  noise_level_gate,
  noise_level_threshold,
  timestep_gate,
)
from lpl_jax.lpl.outliers import kth_smallest_pair, morphology_kernels, outlier_mask, quantile_ranks
from lpl_jax.lpl.terms import depth_weights, masked_distance, normalize

__all__ = [
  'PRESETS',
  'FeaturesFn',
  'LPLConfig',
  'depth_weights',
  'gate_weights',
  'kth_smallest_pair',
  'layer_masks',
  'lpl_loss',
  'make_features_fn',
  'masked_distance',
  'morphology_kernels',
  'noise_level_gate',
  'noise_level_threshold',
  'normalize',
  'outlier_mask',
  'quantile_ranks',
  'timestep_gate',
]
