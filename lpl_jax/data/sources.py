"""Random-access image sources (grain `RandomAccessDataSource`: `__len__`, `__getitem__`).

Every source returns records `{'image': uint8 [H, W, 3], 'label': int32 []}` at the image's own size; cropping and
resizing happen in the pipeline (`lpl_jax.data.pipeline`). Sources are picklable (grain worker processes receive a
copy) and hold no open files in their pickled state.

  * `EmbeddedSource`: the photographs scikit-image ships inside its wheel (no network), class = photograph.
  * `TfdsSource`: a TFDS dataset already prepared on disk in array_record format (`tfds.data_source`).
  * `ImageFolderSource`: `root/<class>/**/<image>`, classes numbered in sorted order.
  * `lpl_jax.data.cache.LatentCacheSource`: latents written by `python -m lpl_jax.encode`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from lpl_jax.data.errors import DataError
from lpl_jax.data.transforms import to_rgb


def _motorcycle() -> np.ndarray:
  import skimage.data

  return skimage.data.stereo_motorcycle()[0]  # left view; the right view is nearly the same picture


def _skimage(name: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()

  return load


# Photographs (and micrographs) whose files are inside the scikit-image wheel: none of these goes through pooch,
# which downloads (pooch is not even installed). Synthetic pictures (logo, colour wheel, horse silhouette, text
# scans) are left out. The order fixes the class ids.
EMBEDDED_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
  **{
    name: _skimage(name)
    for name in (
      'astronaut',
      'brick',
      'camera',
      'cell',
      'chelsea',
      'clock',
      'coffee',
      'coins',
      'grass',
      'gravel',
      'hubble_deep_field',
      'immunohistochemistry',
      'moon',
    )
  },
  'motorcycle': _motorcycle,
  **{name: _skimage(name) for name in ('retina', 'rocket')},
}


@functools.cache
def load_photo(name: str) -> np.ndarray:
  """One embedded photograph as uint8 `[H, W, 3]` (grey ones replicated to RGB), cached per process."""
  if name not in EMBEDDED_PHOTOS:
    raise ValueError(f'unknown embedded photograph {name!r}; known: {list(EMBEDDED_PHOTOS)}.')
  image = to_rgb(EMBEDDED_PHOTOS[name]())
  image.setflags(write=False)
  return image


class EmbeddedSource:
  """The default data set: scikit-image's photographs, `num_samples` records cycling through them.

  Record `i` is the whole photograph `i % num_classes` with label `i % num_classes`; the pipeline's random crop
  (deterministic in the seed and the record's stream position) turns the records into different training images.
  `num_samples` is a virtual length that only defines what an epoch is.
  """

  def __init__(self, num_samples: int = 1024, photos: Sequence[str] | None = None):
    self.class_names = tuple(EMBEDDED_PHOTOS if photos is None else photos)
    unknown = [p for p in self.class_names if p not in EMBEDDED_PHOTOS]
    if unknown or not self.class_names:
      raise ValueError(f'embedded photographs {unknown or "[]"} do not exist; choose from {list(EMBEDDED_PHOTOS)}.')
    if num_samples < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}.')
    self.num_samples = int(num_samples)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return self.num_samples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    label = int(index) % self.num_classes
    return {'image': load_photo(self.class_names[label]), 'label': np.int32(label)}

  def __repr__(self) -> str:
    return f'EmbeddedSource(num_samples={self.num_samples}, photos={len(self.class_names)})'


IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')


class ImageFolderSource:
  """`root/<class name>/.../<file>` with a common image extension; classes are the sorted sub-folder names.

  Files are listed once, in sorted order, so record `i` is the same file on every process.
  """

  def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'image folder {self.root!r} does not exist.')
    extensions = tuple(e.lower() for e in extensions)
    classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith('.'))
    files, labels = [], []
    for label, name in enumerate(classes):
      for folder, subdirs, names in os.walk(os.path.join(self.root, name)):
        subdirs.sort()
        for f in sorted(names):
          if f.lower().endswith(extensions) and not f.startswith('.'):
            files.append(os.path.relpath(os.path.join(folder, f), self.root))
            labels.append(label)
    if not files:
      loose = [f for f in sorted(os.listdir(self.root)) if f.lower().endswith(extensions)]
      hint = (
        f' It holds {len(loose)} images directly ({loose[:3]}...): put them in class sub-folders, e.g. '
        f'{os.path.join(self.root, "0", loose[0])}.'
        if loose
        else ''
      )
      raise DataError(
        f'image folder {self.root!r} has no images in class sub-folders ({len(classes)} sub-folders '
        f'{classes[:5]}, extensions {list(extensions)}).{hint}'
      )
    self.class_names = tuple(classes)
    self.files = tuple(files)
    self.labels = np.asarray(labels, np.int32)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = os.path.join(self.root, self.files[index])
    try:
      with Image.open(path) as img:
        image = np.asarray(img.convert('RGB'))
    except OSError as e:
      raise DataError(f'cannot decode image {path!r}: {e}') from e
    return {'image': image, 'label': self.labels[index]}

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.root!r}, {len(self)} images, {self.num_classes} classes)'


class TfdsSource:
  """A TFDS dataset prepared on disk in array_record format, read with `tfds.data_source` (never downloads).

  Args:
    name: TFDS name, optionally with config and version (`'imagenet2012'`, `'imagenet2012:5.1.0'`).
    split: TFDS split expression (`'train'`, `'validation[:1000]'`, ...).
    data_dir: TFDS data dir (TFDS's default when `None`).
    image_key, label_key: feature names of the image and the class label.
  """

  def __init__(
    self,
    name: str,
    *,
    split: str = 'train',
    data_dir: str | None = None,
    image_key: str = 'image',
    label_key: str = 'label',
  ):
    import tensorflow_datasets as tfds

    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
        f'unknown TFDS dataset {name!r} (no such registered builder, and none prepared in data_dir={data_dir!r}).'
      ) from e
    except NotImplementedError as e:  # what TFDS raises when there are no array_record files
      raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in array_record format in data_dir={data_dir!r}. Nothing is '
        f'downloaded at run time: prepare it first, e.g. `tfds build {name} --file_format=array_record '
        f'--data_dir=...` (ImageNet needs its manual download).'
      ) from e
    except ValueError as e:
      if 'split' in str(e).lower():
        raise ValueError(f'TFDS dataset {name!r} has no split {split!r}: {e}') from e
      raise
    features = self._ds.dataset_info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f'TFDS dataset {name!r} has no feature {key!r}; it has {sorted(features.keys())}.')
    self.num_classes = int(getattr(features[label_key], 'num_classes', 0) or 0)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._ds[int(index)]
    return {'image': to_rgb(example[self.image_key]), 'label': np.int32(example[self.label_key])}

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)'


def make_source(
  spec: str, *, split: str = 'train', data_dir: str | None = None, num_samples: int | None = None, **kwargs: Any
) -> Any:
  """A source from a string: `embedded`, `folder:PATH`, `tfds:NAME` or `cache:PATH` (a latent cache).

  Args:
    spec: which source (the `--source` flag of `lpl_jax.encode`, the `data.source` config key).
    split: TFDS split (`tfds:` only).
    data_dir: TFDS data dir (`tfds:` only).
    num_samples: virtual length of the embedded source (`embedded` only; `None` keeps its default).
    **kwargs: passed to the source's constructor.
  """
  kind, _, arg = spec.partition(':')
  if kind == 'embedded' and not arg:
    return EmbeddedSource(**({'num_samples': num_samples} if num_samples else {}), **kwargs)
  if kind == 'folder' and arg:
    return ImageFolderSource(arg, **kwargs)
  if kind == 'tfds' and arg:
    return TfdsSource(arg, split=split, data_dir=data_dir, **kwargs)
  if kind == 'cache' and arg:
    from lpl_jax.data.cache import LatentCacheSource

    return LatentCacheSource(arg, **kwargs)
  raise ValueError(f'unknown data source {spec!r}; expected embedded, folder:PATH, tfds:NAME or cache:PATH.')
