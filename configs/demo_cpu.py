"""The paper's recipe in miniature on the embedded photographs (scikit-image's), for a 2-core CPU.

  python -m lpl_jax.main --config=configs/demo_cpu.py:pretrain --workdir=runs/demo/pretrain
  python -m lpl_jax.main --config=configs/demo_cpu.py:post,lpl --workdir=runs/demo/post_lpl \
      --config.init.checkpoint=runs/demo/pretrain

Variants (comma-separated): `pretrain` or `post` (phase), `lpl` (post-training with the perceptual loss), `eps`,
`v` or `flow` (formulation, default eps). The autoencoder is the `tiny` preset: random weights unless
`autoencoder.weights` names a trained one (`make demo` trains one first).
"""

from lpl_jax import experiment

VARIANTS = ('pretrain', 'post', 'post,lpl', 'pretrain,flow', 'post,lpl,flow', 'pretrain,v', 'post,lpl,v')


def get_config(arg=None):
  tokens = [t for t in (arg or 'pretrain').split(',') if t]
  phase = 'post' if 'post' in tokens else 'pretrain'
  v = experiment.parse_variant(','.join(t for t in tokens if t not in ('pretrain', 'post')), lpl=False,
                               formulation='eps')
  c = experiment.base_config()
  c.total_steps = 300 if phase == 'pretrain' else 100
  c.log_every = 10
  c.checkpoint_every = 50
  c.sample_every = 0
  c.num_sample_images = 16

  c.data.source = 'embedded'
  c.data.resolution = 32
  c.data.global_batch = 16
  c.data.num_samples = 4096

  c.autoencoder.preset = 'tiny'
  c.autoencoder.allow_random_weights = True
  c.autoencoder.remat = False

  c.model.kind = 'dit'
  c.model.hidden_size = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.num_classes = 16  # more than the embedded photographs; unused ids are never drawn
  c.model.dtype = 'float32'
  c.model.remat = False

  experiment.set_formulation(c, v['formulation'])
  c.optim.lr = 3e-4 if phase == 'pretrain' else 1e-4
  c.optim.warmup_steps = 20
  c.optim.ema_decay = 0.99
  c.optim.ema_warmup = True

  c.lpl.enabled = v['lpl']
  c.lpl.tau = 5.0
  c.lpl.remat = False
  c.sample.steps = 25
  c.sample.guidance = 1.5
  return c
