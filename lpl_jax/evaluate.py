"""FID, precision, recall, density and coverage of a sample batch against a reference batch.

Usage:
  python -m lpl_jax.evaluate --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth [--out=metrics.json] [--batch_size=50] \
      [--nearest_k_pr=3] [--nearest_k_dc=5] [--ref_stats=computed|stored] [--ref_cache=ref_features.npz]

`--samples` is an ADM-layout batch (`arr_0` = uint8 [N, H, W, 3]). `--ref` is a reference batch (`arr_0`, and
optionally `mu`/`sigma`) or a pytorch-fid statistics file (`mu`/`sigma` only: FID alone, the k-NN metrics need
reference images). Features are pytorch-fid's FID Inception pool3 (see docs/eval.md for the weights file; nothing
is downloaded). Precision/recall use k=3 (Kynkaanniemi et al.), density/coverage k=5 (Naeem et al.).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from lpl_jax import eval as lpl_eval


def _parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m lpl_jax.evaluate', description=__doc__.split('\n')[0])
  p.add_argument('--samples', required=True, help='ADM-layout .npz of generated images (arr_0 uint8 [N,H,W,3]).')
  p.add_argument('--ref', required=True, help='reference batch .npz (arr_0, optional mu/sigma) or mu/sigma stats.')
  p.add_argument('--inception', required=True, help='pytorch-fid Inception weights (.pth, or .npz/.safetensors).')
  p.add_argument('--out', default=None, help='write the metrics as JSON here.')
  p.add_argument('--batch_size', type=int, default=50, help='images per Inception batch (all devices together).')
  p.add_argument('--nearest_k_pr', type=int, default=lpl_eval.PR_NEAREST_K, help='k of precision and recall.')
  p.add_argument('--nearest_k_dc', type=int, default=lpl_eval.DC_NEAREST_K, help='k of density and coverage.')
  p.add_argument('--ref_stats', choices=('computed', 'stored'), default='computed',
                 help="FID reference statistics when --ref has both images and mu/sigma: 'computed' from its images "
                      "with this Inception (default), or 'stored' (e.g. the ADM batch's, from ADM's TF evaluator).")
  p.add_argument('--ref_cache', default=None,
                 help='cache of the reference features (.npz with features, mu, sigma); written if missing.')
  p.add_argument('--no_progress', action='store_true', help='hide the progress bars.')
  return p.parse_args(argv)


def _reference(args, feature_fn):
  """`(ref_features or None, mu, sigma, source)` of the reference."""
  if args.ref_cache and os.path.isfile(args.ref_cache):
    with np.load(args.ref_cache, allow_pickle=False) as data:
      features = data['features']
    return features, *lpl_eval.feature_statistics(features), f'cached features {args.ref_cache}'
  stored = lpl_eval.load_statistics(args.ref)
  if not lpl_eval.has_images(args.ref):
    if stored is None:
      raise ValueError(f'{args.ref!r} has neither images (arr_0) nor statistics (mu, sigma).')
    return None, *stored, f'stored mu/sigma of {args.ref}'
  features = feature_fn(args.ref, 'reference')
  if args.ref_cache:
    mu, sigma = lpl_eval.feature_statistics(features)
    np.savez(args.ref_cache, features=features, mu=mu, sigma=sigma)
  if args.ref_stats == 'stored' and stored is not None:
    return features, *stored, f'stored mu/sigma of {args.ref}'
  return features, *lpl_eval.feature_statistics(features), f'Inception features of {args.ref} images'


def evaluate(argv: list[str] | None = None) -> dict:
  """Runs the evaluation described by the command line `argv`; prints and returns (and optionally writes) metrics."""
  args = _parse(argv)
  for k_name in ('nearest_k_pr', 'nearest_k_dc'):
    if getattr(args, k_name) < 1:
      raise ValueError(f'--{k_name} must be >= 1; got {getattr(args, k_name)}.')
  for what, path in (('samples', args.samples), ('reference', args.ref)):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{what} file {path!r} does not exist.')
  samples = lpl_eval.load_npz_images(args.samples)  # layout checked before the (slow) weight import
  k_max = max(args.nearest_k_pr, args.nearest_k_dc)
  if samples.shape[0] < k_max + 1:
    raise ValueError(f'{samples.shape[0]} samples are too few for nearest_k={k_max}: need at least {k_max + 1}.')
  _, params = lpl_eval.load_inception(args.inception)

  def feature_fn(images, desc):
    return lpl_eval.extract_features(images, lpl_eval.fid_features, args.batch_size, params=params,
                                     progress=not args.no_progress, desc=desc)

  ref_features, mu_ref, sigma_ref, ref_source = _reference(args, feature_fn)
  fake = feature_fn(samples, 'samples')
  mu, sigma = lpl_eval.feature_statistics(fake)
  metrics = dict(fid=lpl_eval.frechet_distance(mu, sigma, mu_ref, sigma_ref))
  if ref_features is not None:
    pr = lpl_eval.prdc(ref_features, fake, nearest_k=args.nearest_k_pr)
    dc = lpl_eval.prdc(ref_features, fake, nearest_k=args.nearest_k_dc)
    metrics.update(precision=pr['precision'], recall=pr['recall'], density=dc['density'], coverage=dc['coverage'])
  else:
    print('reference has no images: precision/recall/density/coverage need reference features (null).')
    metrics.update(precision=None, recall=None, density=None, coverage=None)
  metrics.update(num_samples=int(fake.shape[0]),
                 num_reference=None if ref_features is None else int(ref_features.shape[0]),
                 nearest_k_pr=args.nearest_k_pr, nearest_k_dc=args.nearest_k_dc, reference_statistics=ref_source)
  for name in ('fid', 'precision', 'recall', 'density', 'coverage'):
    value = metrics[name]
    print(f'{name:>10}: {"n/a" if value is None else f"{value:.6f}"}')
  if args.out:
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(metrics, f, indent=2)
    os.replace(tmp, args.out)
    print(f'wrote {args.out}')
  return metrics


def main(argv: list[str] | None = None) -> None:
  try:
    evaluate(argv)
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
