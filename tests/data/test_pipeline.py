"""Pipeline semantics: seed-determined order, restart from a saved state, the same global batch for any process
count, per-epoch shuffling, crops and flips."""

import itertools

import grain
import numpy as np
import pytest
from etils import epath

from lpl_jax import data


class IndexSource:
  """Record `i`: an 8x8 image whose pixels all equal `i % 256`, label `i` (so batches can be read back as indices)."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((8, 8, 3), i % 256, np.uint8), 'label': np.int32(i)}


def take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)]


def embedded(**kw):
  args = dict(
    resolution=16, global_batch=8, seed=3, random_crop=True, random_flip=True, process_index=0, process_count=1
  )
  args.update(kw)
  return data.make_image_pipeline(data.EmbeddedSource(num_samples=20), **args)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout():
  (batch,) = take(embedded(), 1)
  assert batch['images'].shape == (8, 16, 16, 3) and batch['images'].dtype == np.float32
  assert batch['labels'].shape == (8,) and batch['labels'].dtype == np.int32
  assert -1.0 <= batch['images'].min() and batch['images'].max() <= 1.0


def test_same_seed_same_batches_other_seed_other_batches():
  # 7 steps of 8 records cross two epoch boundaries of the 20-record source.
  a, b, c = take(embedded(), 7), take(embedded(), 7), take(embedded(seed=4), 7)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['labels'], c[0]['labels'])
  assert all(not np.array_equal(x['images'], y['images']) for x, y in zip(a, c))


def test_each_epoch_is_a_new_permutation():
  ds = data.make_image_pipeline(IndexSource(12), resolution=8, global_batch=4, seed=0, process_index=0, process_count=1)
  order = np.concatenate([b['labels'] for b in take(ds, 9)])  # 3 epochs
  epochs = order.reshape(3, 12)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(12))
  assert not np.array_equal(epochs[0], np.arange(12))
  assert len({tuple(e) for e in epochs}) == 3
  # Pixels carry the index too: the image belongs to the label (no mixing of rows).
  batch = take(ds, 1)[0]
  np.testing.assert_array_equal(np.round((batch['images'][:, 0, 0, 0] + 1) * 127.5), batch['labels'])


def test_unshuffled_finite_epochs_are_in_source_order_and_drop_the_partial_batch():
  ds = data.make_image_pipeline(
    IndexSource(10), resolution=8, global_batch=4, seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1
  )
  labels = [b['labels'].tolist() for b in ds]
  assert labels == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_random_transforms_depend_on_stream_position_not_batching():
  big = take(embedded(global_batch=8), 3)
  small = take(embedded(global_batch=4), 6)
  merged = [{k: np.concatenate([x[k], y[k]]) for k in x} for x, y in zip(small[::2], small[1::2])]
  assert_batches_equal(big, merged)


def test_restart_from_saved_state_mid_epoch():
  reference = take(embedded(), 9)
  it = iter(embedded())
  for _ in range(3):
    next(it)
  saved = data.iterator_state_to_bytes(it.get_state())
  del it  # "process restart": a new source, a new pipeline, the state read back from bytes
  resumed = take(embedded(), 6, state=data.iterator_state_from_bytes(saved))
  assert_batches_equal(resumed, reference[3:])


def test_restart_through_grain_orbax_handler(tmp_path):
  it = iter(embedded())
  for _ in range(2):
    next(it)
  expected = [next(it) for _ in range(2)]
  fresh = iter(embedded())
  it2 = iter(embedded())
  for _ in range(2):
    next(it2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it2)
  handler.restore(epath.Path(tmp_path), item=fresh)
  assert_batches_equal([next(fresh) for _ in range(2)], expected)


@pytest.mark.parametrize('resume_at', [None, 2])
def test_two_processes_concatenate_to_the_one_process_batch(resume_at):
  one = take(embedded(global_batch=8), 6)
  shares = []
  for p in range(2):
    ds = embedded(global_batch=8, process_index=p, process_count=2)
    if resume_at is None:
      shares.append(take(ds, 6))
    else:
      it = iter(ds)
      for _ in range(resume_at):
        next(it)
      state = data.iterator_state_from_bytes(data.iterator_state_to_bytes(it.get_state()))
      shares.append(
        [{}] * resume_at + take(embedded(global_batch=8, process_index=p, process_count=2), 6 - resume_at, state=state)
      )
  start = resume_at or 0
  for step in range(start, 6):
    a, b = shares[0][step], shares[1][step]
    assert a['images'].shape[0] == 4
    assert_batches_equal([{k: np.concatenate([a[k], b[k]]) for k in a}], [one[step]])


def test_state_is_the_step_and_moves_between_process_counts():
  it = iter(embedded())
  for _ in range(4):
    next(it)
  state = it.get_state()
  assert state == {'next_index': 4}
  one = take(embedded(), 2, state=state)
  halves = [take(embedded(process_index=p, process_count=2), 2, state=state) for p in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(np.concatenate([h[step]['images'] for h in halves]), one[step]['images'])


def test_crops_and_flips_against_numpy(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  pic = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  (tmp_path / 'a').mkdir()
  Image.fromarray(pic).save(tmp_path / 'a' / 'x.png')
  src = data.ImageFolderSource(tmp_path)
  to_u8 = lambda x: np.round((x + 1) * 127.5).astype(np.uint8)

  # Centre crop at the short side's resolution: no resampling, exactly the middle 12x12 square.
  (center,) = take(
    data.make_image_pipeline(src, resolution=12, global_batch=1, seed=0, process_index=0, process_count=1), 1
  )
  np.testing.assert_array_equal(to_u8(center['images'][0]), pic[:, 4:16])

  # Full-size random crops at native resolution: each is a 12x12 window of the picture, possibly mirrored, and both
  # orientations and several offsets occur.
  ds = data.make_image_pipeline(
    src,
    resolution=12,
    global_batch=1,
    seed=0,
    random_crop=True,
    crop_scale=(1.0, 1.0),
    random_flip=True,
    process_index=0,
    process_count=1,
  )
  windows = {
    (left, flip): (pic[:, left : left + 12, :][:, ::-1] if flip else pic[:, left : left + 12])
    for left, flip in itertools.product(range(9), (False, True))
  }
  seen = set()
  for b in take(ds, 40):
    got = to_u8(b['images'][0])
    match = [key for key, w in windows.items() if np.array_equal(w, got)]
    assert match, 'a random crop is not a window of the picture'
    seen.add(match[0])
  assert {flip for _, flip in seen} == {False, True}
  assert len({left for left, _ in seen}) >= 4


def test_global_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match='global batch 6 is not divisible by the process count 4'):
    embedded(global_batch=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r'process_index=2 is not in \[0, process_count=2\)'):
    embedded(process_index=2, process_count=2)


def test_too_few_records_for_one_batch():
  with pytest.raises(ValueError, match='make no complete global batch of 16'):
    data.make_image_pipeline(
      IndexSource(10), resolution=8, global_batch=16, seed=0, num_epochs=1, process_index=0, process_count=1
    )


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore():
  reference = take(embedded(), 6)
  ds = embedded(worker_count=2)
  it = iter(ds)
  got = [next(it) for _ in range(3)]
  state = data.iterator_state_from_bytes(data.iterator_state_to_bytes(it.get_state()))
  it.close()
  assert_batches_equal(got, reference[:3])
  it2 = iter(embedded(worker_count=2))
  it2.set_state(state)
  assert_batches_equal([next(it2) for _ in range(3)], reference[3:])
  it2.close()
