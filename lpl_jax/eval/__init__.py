"""Evaluation: FID (pytorch-fid's Inception in Flax), precision/recall/density/coverage, power spectra.

`evaluate_samples` computes the metrics of a sample batch against a reference (`python -m lpl_jax.evaluate`).

`small_domain` holds a small CNN for offline demos; its Frechet distance is NOT Inception-FID.
"""

from lpl_jax.eval.batches import check_images, has_images, load_npz_images, save_npz_images
from lpl_jax.eval.features import default_mesh, extract_features
from lpl_jax.eval.fid import feature_statistics, frechet_distance, load_statistics, reference_stats, save_statistics
from lpl_jax.eval.inception import (
  FIDInceptionV3,
  convert_weights,
  fid_features,
  load_inception,
  preprocess,
  resize_bilinear,
)
from lpl_jax.eval.prdc import DC_NEAREST_K, PR_NEAREST_K, prdc
from lpl_jax.eval.sample_metrics import evaluate_samples
from lpl_jax.eval.spectrum import log_spectrum_difference, plot_spectrum_difference, radial_power_spectrum
from lpl_jax.weights import WeightsMismatchError

__all__ = [
  'DC_NEAREST_K',
  'FIDInceptionV3',
  'PR_NEAREST_K',
  'WeightsMismatchError',
  'check_images',
  'convert_weights',
  'default_mesh',
  'evaluate_samples',
  'extract_features',
  'feature_statistics',
  'fid_features',
  'frechet_distance',
  'has_images',
  'load_inception',
  'load_npz_images',
  'load_statistics',
  'log_spectrum_difference',
  'plot_spectrum_difference',
  'prdc',
  'preprocess',
  'radial_power_spectrum',
  'reference_stats',
  'resize_bilinear',
  'save_npz_images',
  'save_statistics',
]
