"""The paper's recipe in miniature on the embedded photographs (scikit-image's), for a 2-core CPU.

  python -m lpl_jax.main --config=configs/demo_cpu.py:pretrain --workdir=runs/demo/pretrain
  python -m lpl_jax.main --config=configs/demo_cpu.py:post,lpl --workdir=runs/demo/post_lpl \\
      --config.init.checkpoint=runs/demo/pretrain --config.autoencoder.weights=runs/demo/autoencoder/...

Variants (comma-separated): `pretrain` or `post` (phase), `lpl` (post-training with the perceptual loss), `eps`,
`v` or `flow` (formulation, default eps). The autoencoder is the `tiny` preset: random weights unless
`autoencoder.weights` names a trained one (`make demo` trains one first and passes it). The settings live in
`lpl_jax.experiment.demo_config`, which `make demo` uses too.
"""

from lpl_jax import experiment

VARIANTS = experiment.DEMO_VARIANTS


def get_config(arg=None):
  return experiment.demo_config(arg)
