"""Sources: the embedded photographs, an image folder, TFDS (mock records behind TFDS's real data source), errors."""

import pickle
import re

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from lpl_jax import data


def first_batch(source, **kw):
  args = dict(resolution=32, global_batch=4, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return next(iter(data.make_image_pipeline(source, **args)))


def test_embedded_source_classes_are_the_photographs():
  src = data.EmbeddedSource(num_samples=40)
  assert len(src) == 40 and src.num_classes == len(data.EMBEDDED_PHOTOS) == 16
  assert src.class_names[0] == 'astronaut' and src.class_names[2] == 'camera'
  # Record i is photograph i % 16, whole and RGB.
  np.testing.assert_array_equal(src[16]['image'], skimage.data.astronaut())
  camera = src[2]['image']
  assert camera.shape == (512, 512, 3) and int(src[18]['label']) == 2
  np.testing.assert_array_equal(camera[..., 0], skimage.data.camera())
  np.testing.assert_array_equal(camera[..., 1], camera[..., 2])
  for i in range(src.num_classes):
    rec = src[i]
    assert rec['image'].dtype == np.uint8 and rec['image'].ndim == 3 and rec['image'].shape[-1] == 3
    assert rec['label'].dtype == np.int32 and int(rec['label']) == i


def test_embedded_pipeline_centre_crops_match_the_photographs():
  src = data.EmbeddedSource(num_samples=16)
  batch = first_batch(src, resolution=64, global_batch=16, shuffle=False)
  np.testing.assert_array_equal(batch['labels'], np.arange(16))
  assert batch['images'].shape == (16, 64, 64, 3) and batch['images'].dtype == np.float32
  assert batch['images'].min() >= -1 and batch['images'].max() <= 1
  # The astronaut photograph is square: its centre crop is the photograph, resized independently here.
  expected = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((64, 64), Image.Resampling.BICUBIC))
  np.testing.assert_allclose(batch['images'][0], expected / 127.5 - 1, atol=1e-6)
  # Random crops of the same records differ from the centre crops but keep the labels.
  crops = first_batch(src, resolution=64, global_batch=16, shuffle=False, random_crop=True)
  np.testing.assert_array_equal(crops['labels'], batch['labels'])
  assert not np.allclose(crops['images'], batch['images'])


def write_folder(root, sizes):
  rng = np.random.default_rng(0)
  expected = []
  for cls, names in sizes.items():
    (root / cls).mkdir(parents=True)
    for name, (h, w, mode) in names.items():
      pic = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pic).convert(mode).save(root / cls / name)
      expected.append((cls, name, pic))
  return expected


def test_image_folder(tmp_path):
  write_folder(
    tmp_path,
    {
      'zebra': {'b.png': (20, 30, 'RGB'), 'a.jpg': (16, 16, 'RGB')},
      'ant': {'x.PNG': (24, 18, 'L')},
      'cat': {'c.bmp': (17, 19, 'RGBA')},
    },
  )
  (tmp_path / 'cat' / 'readme.txt').write_text('not an image')
  src = data.ImageFolderSource(tmp_path)
  assert src.class_names == ('ant', 'cat', 'zebra')
  assert src.files == ('ant/x.PNG', 'cat/c.bmp', 'zebra/a.jpg', 'zebra/b.png')
  np.testing.assert_array_equal([int(src[i]['label']) for i in range(4)], [0, 1, 2, 2])
  grey = src[0]['image']
  assert grey.shape == (24, 18, 3) and np.array_equal(grey[..., 0], grey[..., 2])
  assert src[1]['image'].shape == (17, 19, 3)  # alpha dropped
  batch = first_batch(src, resolution=16, shuffle=False)
  assert batch['images'].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batch['labels'], [0, 1, 2, 2])
  assert data.make_source(f'folder:{tmp_path}').files == src.files


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.ImageFolderSource(tmp_path / 'missing')
  with pytest.raises(data.DataError, match='has no images in class sub-folders'):
    data.ImageFolderSource(tmp_path)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'loose.png')
  (tmp_path / 'empty_class').mkdir()
  with pytest.raises(ValueError, match='put them in class sub-folders'):
    data.ImageFolderSource(tmp_path)


def test_undecodable_image_is_a_data_error(tmp_path):
  write_folder(tmp_path, {'cls': {'a.png': (8, 8, 'RGB')}})
  (tmp_path / 'cls' / 'bad.png').write_bytes(b'not an image')
  src = data.ImageFolderSource(tmp_path)
  assert src.files == ('cls/a.png', 'cls/bad.png') and src[0]['image'].shape == (8, 8, 3)
  bad = str(tmp_path / 'cls' / 'bad.png')
  with pytest.raises(data.DataError, match=f'cannot decode image {re.escape(repr(bad))}: ') as info:
    src[1]
  # Grain carries a worker's exception to the main process pickled: it must survive that, message and all.
  again = pickle.loads(pickle.dumps(info.value))
  assert type(again) is data.DataError and str(again) == str(info.value) and isinstance(again, ValueError)


def write_tfds_metadata(data_dir, name='imagenet2012', splits=(('train', 10), ('validation', 4))):
  """Real TFDS metadata (dataset_info.json, features.json) for `name`, written with TFDS's own APIs; the records
  themselves come from `tfds.testing.mock_data` (writing array_record image records needs TensorFlow's encoder)."""
  builder = tfds.builder(name, data_dir=str(data_dir), file_format='array_record')
  template = lambda split: tfds.core.ShardedFileTemplate(
    data_dir=builder.data_path, dataset_name=name, split=split, filetype_suffix='array_record'
  )
  builder.info.set_splits(
    tfds.core.SplitDict(
      [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=template(s)) for s, n in splits]
    )
  )
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


def test_tfds_source_and_pipeline(tmp_path):
  write_tfds_metadata(tmp_path)
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
    src = data.make_source('tfds:imagenet2012', split='train', data_dir=str(tmp_path))
    assert isinstance(src, data.TfdsSource) and len(src) == 10 and src.num_classes == 1000
    rec = src[3]
    assert rec['image'].dtype == np.uint8 and rec['image'].shape[-1] == 3 and rec['label'].dtype == np.int32
    assert 0 <= int(rec['label']) < 1000
    ds = data.make_image_pipeline(
      src,
      resolution=16,
      global_batch=4,
      seed=0,
      shuffle=False,
      random_crop=True,
      num_epochs=1,
      process_index=0,
      process_count=1,
    )
    batches = list(ds)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]['labels'], [int(src[i]['label']) for i in range(4)])
    assert batches[1]['images'].shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="TFDS dataset 'imagenet2012' has no split 'tain'.*train"):
      data.TfdsSource('imagenet2012', split='tain', data_dir=str(tmp_path))


def test_tfds_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
    data.TfdsSource('no_such_dataset_xyz', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="'imagenet2012' is not prepared in array_record format.*downloaded"):
    data.TfdsSource('imagenet2012', data_dir=str(tmp_path))


def test_unknown_source_spec():
  with pytest.raises(ValueError, match="unknown data source 'tfds'; expected embedded, folder:PATH"):
    data.make_source('tfds')
  with pytest.raises(ValueError, match='embedded photographs'):
    data.EmbeddedSource(photos=['astronaut', 'lena'])
