"""Training a KL autoencoder (LDM's recipe) on the embedded photographs, exported in diffusers format.

`python -m lpl_jax.train_autoencoder --config=configs/autoencoder.py` is the command line;
`ensure_autoencoder(cache_dir, **settings)` trains once and returns the cached folder afterwards. A non-finite logged
loss stops a run with `lpl_jax.train.errors.NonFiniteLossError`.
"""

from lpl_jax.train.autoencoder.config import AETrainConfig
from lpl_jax.train.autoencoder.loop import ensure_autoencoder, evaluate, export, read_training_info, train

__all__ = ['AETrainConfig', 'ensure_autoencoder', 'evaluate', 'export', 'read_training_info', 'train']
