"""Training a KL autoencoder (LDM's recipe) on the embedded photographs, exported in diffusers format.

`python -m lpl_jax.train_autoencoder` is the command line; `ensure_autoencoder(cache_dir, **settings)` trains once
and returns the cached folder afterwards.
"""

from lpl_jax.aetrain.config import AETrainConfig
from lpl_jax.aetrain.run import NonFiniteLossError, ensure_autoencoder, evaluate, export, read_training_info, train

__all__ = ['AETrainConfig', 'NonFiniteLossError', 'ensure_autoencoder', 'evaluate', 'export', 'read_training_info',
           'train']
