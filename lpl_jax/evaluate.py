"""`python -m lpl_jax.evaluate`: FID, precision, recall, density and coverage of a sample batch against a reference;
or, with `--write_reference`, the reference file of a data source for the training loop's evaluation (docs/eval.md).

Usage:
  python -m lpl_jax.evaluate --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth [--out=metrics.json] [--batch_size=50] \
      [--nearest_k_pr=3] [--nearest_k_dc=5] [--ref_stats=computed|stored] [--ref_cache=ref_features.npz]
  python -m lpl_jax.evaluate --write_reference=ref.npz --source=embedded|folder:PATH|tfds:NAME --resolution=256 \
      --features=inception|small_domain [--inception=...] [--small_domain=params.npz] [--num_images=50000] ...

`--samples` is an ADM-layout batch (`arr_0` = uint8 [N, H, W, 3]). `--ref` is a reference batch (`arr_0`, and
optionally `mu`/`sigma`) or a pytorch-fid statistics file (`mu`/`sigma` only: FID alone, the k-NN metrics need
reference images). Features are pytorch-fid's FID Inception pool3 (see docs/eval.md for the weights file; nothing
is downloaded). Precision/recall use k=3 (Kynkaanniemi et al.), density/coverage k=5 (Naeem et al.). The work is
`lpl_jax.eval.evaluate_samples`; bad input ends with one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

from absl import app, flags

from lpl_jax import eval as lpl_eval
from lpl_jax.cli import USER_ERRORS, define_verbose_flag, parse_flags_or_exit, run_or_exit
from lpl_jax.eval.reference import DEFAULT_NUM_PRDC, EXTRACTORS

_SAMPLES = flags.DEFINE_string('samples', None, 'ADM-layout .npz of generated images (arr_0 uint8 [N,H,W,3]).')
_REF = flags.DEFINE_string('ref', None, 'Reference batch .npz (arr_0, optional mu/sigma) or mu/sigma statistics.')
_INCEPTION = flags.DEFINE_string('inception', None, 'pytorch-fid Inception weights (.pth, or .npz/.safetensors).')
_OUT = flags.DEFINE_string('out', None, 'Write the metrics as JSON here.')
_BATCH = flags.DEFINE_integer('batch_size', 50, 'Images per Inception batch (all devices together).')
_K_PR = flags.DEFINE_integer('nearest_k_pr', lpl_eval.PR_NEAREST_K, 'k of precision and recall.')
_K_DC = flags.DEFINE_integer('nearest_k_dc', lpl_eval.DC_NEAREST_K, 'k of density and coverage.')
_REF_STATS = flags.DEFINE_enum(
  'ref_stats',
  'computed',
  ['computed', 'stored'],
  'FID reference statistics when --ref '
  "has both images and mu/sigma: 'computed' from its images with this Inception, or "
  "'stored' (e.g. the ADM batch's, from ADM's TF evaluator).",
)
_REF_CACHE = flags.DEFINE_string(
  'ref_cache', None, 'Cache of the reference features (.npz with features, mu, sigma); written if missing.'
)
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show progress bars (--noprogress: none).')
_WRITE_REFERENCE = flags.DEFINE_string('write_reference', None, 'Write the reference file of --source here instead.')
_WRITER = dict(  # --write_reference's settings (references.write_reference's arguments)
  source=flags.DEFINE_string('source', 'embedded', 'Images: embedded, folder:PATH or tfds:NAME (data.source).'),
  split=flags.DEFINE_string('split', 'train', 'The TFDS split.'),
  data_dir=flags.DEFINE_string('data_dir', None, 'The TFDS data dir.'),
  resolution=flags.DEFINE_integer('resolution', None, 'Image side (data.resolution).'),
  features=flags.DEFINE_enum('features', 'inception', list(EXTRACTORS), 'Feature extractor (eval.features).'),
  num_images=flags.DEFINE_integer('num_images', 50000, 'Images behind mu and sigma.'),
  num_prdc=flags.DEFINE_integer('num_prdc', DEFAULT_NUM_PRDC, 'Real features kept for precision/recall/...'),
  seed=flags.DEFINE_integer('seed', 0, 'Image order and random crops.'),
  random_crop=flags.DEFINE_bool('random_crop', None, 'Random square crops (default: the embedded source only).'),
  small_domain_params=flags.DEFINE_string('small_domain', None, '--features=small_domain params; default: train one.'),
  small_domain_steps=flags.DEFINE_integer('small_domain_steps', 300, 'Steps to train that extractor.'),
)
_VERBOSE = define_verbose_flag()


def _required(name, needed):  # `--name` must be given when `needed()`, with absl's message
  message = f'Flag --{name} must have a value other than None.'
  flags.register_validator(name, lambda value: value is not None or not needed(), message=message)


_required('samples', lambda: _WRITE_REFERENCE.value is None)
_required('ref', lambda: _WRITE_REFERENCE.value is None)
_required('inception', lambda: _WRITE_REFERENCE.value is None or _WRITER['features'].value == 'inception')
_required('resolution', lambda: _WRITE_REFERENCE.value is not None)


def write_reference():
  from lpl_jax.train import references  # the data sources and pipeline: needed in this mode only

  settings = {k: flag.value for k, flag in _WRITER.items()}
  settings.update(inception=_INCEPTION.value, batch_size=_BATCH.value, progress=_PROGRESS.value)
  errors = USER_ERRORS + (ValueError, ImportError)
  ref = run_or_exit(
    lambda: references.write_reference(_WRITE_REFERENCE.value, **settings), errors, verbose=_VERBOSE.value
  )
  print(f'wrote {_WRITE_REFERENCE.value}: {ref.extractor} features of {ref.num_images} {ref.resolution} px images')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _WRITE_REFERENCE.value is not None:
    return write_reference()
  # ImportError: a torch .pth weights file without torch installed (the message says how to convert it).
  metrics = run_or_exit(
    lambda: lpl_eval.evaluate_samples(
      _SAMPLES.value,
      _REF.value,
      _INCEPTION.value,
      batch_size=_BATCH.value,
      nearest_k_pr=_K_PR.value,
      nearest_k_dc=_K_DC.value,
      ref_stats=_REF_STATS.value,
      ref_cache=_REF_CACHE.value,
      progress=_PROGRESS.value,
      out=_OUT.value,
    ),
    USER_ERRORS + (ValueError, ImportError),
    verbose=_VERBOSE.value,
  )
  if metrics['num_reference'] is None:
    print('reference has no images: precision/recall/density/coverage need reference features (null).')
  for name in ('fid', 'precision', 'recall', 'density', 'coverage'):
    value = metrics[name]
    print(f'{name:>10}: {"n/a" if value is None else f"{value:.6f}"}')
  if _OUT.value:
    print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags_or_exit)
