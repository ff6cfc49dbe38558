"""lpl-jax: latent diffusion with the latent perceptual loss (Berrada et al., ICLR 2025) in JAX/Flax."""

__version__ = '0.1.0'
