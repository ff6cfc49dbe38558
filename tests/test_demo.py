"""The `make demo` job runs end to end on the embedded photograph and writes what it says it writes."""

import numpy as np
from PIL import Image

from lpl_jax import demo


def test_demo_writes_reconstruction_and_feature_maps(tmp_path, capsys):
  demo.main(['--workdir', str(tmp_path), '--seed', '1'])
  printed = capsys.readouterr().out
  assert 'RANDOM weights' in printed and str(tmp_path / 'decoder_features.png') in printed
  recon = np.asarray(Image.open(tmp_path / 'reconstruction.png'))
  assert recon.shape == (demo.IMAGE_SIZE, 2 * demo.IMAGE_SIZE, 3)
  # The left half is the photograph itself: not constant, and the same as load_photo() after quantisation.
  np.testing.assert_array_equal(recon[:, :demo.IMAGE_SIZE], demo.to_uint8(demo.load_photo()[0]))
  assert recon[:, :demo.IMAGE_SIZE].std() > 20
  features = Image.open(tmp_path / 'decoder_features.png')
  assert features.size[0] > 400 and features.size[1] > 400
  for line, shape in zip(('mid', 'up_0', 'up_3'), ('(1, 16, 16, 128)', '(1, 32, 32, 128)', '(1, 128, 128, 32)')):
    assert any(row.strip().startswith(line) and shape in row for row in printed.splitlines())
