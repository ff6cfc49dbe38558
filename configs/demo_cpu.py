"""The paper's recipe in miniature on the embedded photographs (scikit-image's) at 32 px, for a 2-core CPU.

  python -m lpl_jax.main --config=configs/demo_cpu.py:pretrain --workdir=runs/demo/pretrain
  python -m lpl_jax.main --config=configs/demo_cpu.py:post,lpl --workdir=runs/demo/post_lpl \\
      --config.init.checkpoint=runs/demo/pretrain --config.autoencoder.weights=runs/demo/autoencoder/...

Variants (configs/common.py's grammar): `pretrain` or `post` (phase), `lpl` (post-training with the perceptual
loss), `eps`, `v` or `flow` (formulation, default eps). The autoencoder is the `tiny` preset: random weights unless
`autoencoder.weights` names a trained one (`make demo` trains one first and passes it; it also sets the step counts
and the data, see lpl_jax/workflows/miniature.py).
"""

from configs import common

VARIANTS = ('pretrain', 'post', 'post,lpl', 'pretrain,flow', 'post,lpl,flow', 'pretrain,v', 'post,lpl,v')


def get_config(arg=None):
  v = common.parse_variant(arg, phase='pretrain', res=32)
  pretrain = v['phase'] == 'pretrain'
  c = common.base()
  c.total_steps = 1500 if pretrain else 400
  c.log_every = 10
  c.checkpoint_every = 250
  c.num_sample_images = 16

  c.data.source = 'embedded'
  c.data.resolution = v['res']
  c.data.global_batch = 16
  c.data.num_samples = 4096
  c.data.random_crop = True

  c.autoencoder.preset = 'tiny'  # random weights unless autoencoder.weights names a trained one (make demo does)
  c.autoencoder.allow_random_weights = True

  c.model.kind = 'dit'
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.num_classes = 16  # at least the number of embedded photographs (their index is the class)
  c.model.dtype = 'float32'
  c.model.remat = False

  common.set_formulation(c, v['formulation'])
  c.optim.lr = 5e-4 if pretrain else 2e-4
  c.optim.warmup_steps = 50 if pretrain else 0
  if pretrain:
    c.optim.ema_decay, c.optim.ema_warmup = 0.998, True
  else:  # the paper's EMA half-lives (0.9999: 6930 and, with LPL, 0.99975: 2770 iterations of a 100k-iteration
    # post-training) as the same fractions of these 400 steps: 28 and 11 steps. No warmup: the post-training EMA
    # starts from the pre-training one.
    c.optim.ema_decay, c.optim.ema_warmup = (0.94 if v['lpl'] else 0.975), False

  c.lpl.enabled = v['lpl']
  c.lpl.remat = False
  c.sample.steps = 25
  c.sample.guidance = 1.5
  return c
