"""Small autoencoders for tests."""

from lpl_jax import autoencoder as ae

# A two-level autoencoder (f=2) with every kind of layer that compiles in seconds; scaling and shift are not 1 and 0,
# so that code that forgot to scale latents (or scaled them twice) is caught.
SMALL = ae.AutoencoderConfig(
  block_out_channels=(8, 16),
  decoder_block_out_channels=(8, 16),
  layers_per_block=1,
  decoder_layers_per_block=1,
  latent_channels=4,
  norm_num_groups=4,
  scaling_factor=0.5,
  shift_factor=0.1,
)
