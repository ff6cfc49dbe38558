"""Report figures: the masks a figure shows are the ones the loss applies, and sample grids are laid out row-major."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lpl_jax import lpl
from lpl_jax.eval import report
from tests.tiny_autoencoder import tiny_autoencoder


@pytest.fixture(scope='module')
def tiny():
  return tiny_autoencoder()


@pytest.mark.parametrize('preset', ['paper', 'reference'])
def test_figure_masks_are_the_loss_masks(tiny, preset):
  """With `z0_hat = z0` the loss's masked fraction per tap is the masked fraction of the figure's masks: both come
  from `lpl.layer_masks` on the same features. Computed the other way too, from an independent mask per tap."""
  model, params = tiny
  cfg = lpl.LPLConfig.from_preset(preset, num_blocks=3, remat=False)
  z = jax.random.normal(jax.random.key(1), (2, 8, 8, model.config.latent_channels)) * 3.0
  taps = report.features_and_masks(model, params, z, cfg)
  assert [name for name, _, _ in taps] == [report.TAP_NAMES[i] for i in cfg.used_layers]
  _, aux = lpl.lpl_loss(lpl.make_features_fn(model, params, cfg), z, z, cfg)
  fractions = np.asarray(aux['outlier_fraction'])
  assert fractions.max() > 0  # some positions are masked: the comparison is not between all-keep masks
  for j, (name, feats, mask) in enumerate(taps):
    if cfg.used_layers[j] in cfg.outlier_layers:
      assert mask is not None and mask.shape == feats.shape and mask.dtype == bool, name
      np.testing.assert_allclose(1.0 - mask.mean(axis=(1, 2, 3)), fractions[:, j], atol=1e-6, err_msg=name)
      down = model.config.downsample_factor * z.shape[1] / feats.shape[1]
      alone = lpl.outlier_mask(
        jnp.asarray(feats),
        quant=cfg.quant,
        down_factor=down,
        opening=cfg.opening,
        closing=cfg.closing,
        margin_std=cfg.margin_std,
      )
      np.testing.assert_array_equal(mask, np.asarray(alone), err_msg=name)
    else:
      assert mask is None and np.all(fractions[:, j] == 0), name


def test_layer_masks_checks_the_number_of_maps():
  cfg = lpl.LPLConfig.from_preset('paper', num_blocks=2)
  with pytest.raises(ValueError, match='2 feature maps for the 3 used taps'):
    lpl.layer_masks([jnp.zeros((1, 4, 4, 2))] * 2, cfg, 32)


def test_save_grid_is_row_major(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  path = report.save_grid(images, str(tmp_path / 'sub' / 'grid.png'), columns=2)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (3 * 4, 2 * 6, 3)
  for i, image in enumerate(images):
    r, c = divmod(i, 2)
    np.testing.assert_array_equal(grid[r * 4 : (r + 1) * 4, c * 6 : (c + 1) * 6], image)
  np.testing.assert_array_equal(grid[8:, 6:], 0)  # the sixth cell is empty
