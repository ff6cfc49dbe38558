"""Post-training Stable Diffusion 3 medium's MMDiT on cached text embeddings, without and with LPL.

  --config=configs/sd3.py:post512[,lpl]     post-training at 512 px (64 x 64 x 16 latents), without/with LPL
  --config=configs/sd3.py:post1024[,lpl]    post-training at 1024 px (128 x 128 x 16 latents), SD3's resolution

Weights: `--config.init.checkpoint=` the `transformer` folder of stabilityai/stable-diffusion-3-medium-diffusers
(diffusers' `SD3Transformer2DModel`), and `--config.autoencoder.weights=` its `vae` folder (16 latent channels,
scaling 1.5305, shift 0.0609). Data: a latent cache (`--config.data.source=cache:PATH`, `python -m lpl_jax.encode`)
whose text embeddings are SD3's: the CLIP-L and CLIP-G token embeddings (77 x 768 and 77 x 1280, concatenated and
zero-padded to 4096) followed by T5-XXL's (256 x 4096), 333 tokens x 4096, and the pooled CLIP-L + CLIP-G vector
(2048) as `pooled`. docs/pretrained.md describes the whole path.

From SD3 (Esser et al. 2024; diffusers' model config): 24 joint blocks of width 1536 (24 heads of 64), patch 2,
positions cropped from a 192 x 192 sin-cos grid built for 64 x 64 patches, no QK-norm (SD3.5 large has it:
`--config.model.qk_norm=True` with its sizes), rectified flow with logit-normal timesteps (mean 0, std 1) and the
time shift 3.0, Euler sampling with 28 steps and guidance 7.0.

Chosen here, not stated by SD3 or the LPL paper: AdamW at 1e-5 without weight decay (a fine-tuning rate for a model
this size), EMA 0.9999, 20k steps, global batch 64, caption dropout 0.1 (zero embeddings as the null condition), the
LPL paper preset with its noise threshold scaled to the resolution, one row at a time through the decoder.
"""

from configs import common

VARIANTS = ('post512', 'post512,lpl', 'post1024', 'post1024,lpl')
RESOLUTIONS = (512, 1024)


def get_config(arg=None):
  v = common.parse_variant(arg, phase='post', res=1024)
  if v['phase'] != 'post' or v['res'] not in RESOLUTIONS or v['formulation'] != 'eps':
    raise ValueError(f'sd3.py post-trains SD3 medium, a flow model: post512[,lpl] or post1024[,lpl]; got {arg!r}.')
  c = common.base()
  c.total_steps = 20_000
  c.log_every = 100
  c.checkpoint_every = 2_000
  c.sample_every = 2_000
  c.data.source = 'cache:'  # set --config.data.source=cache:PATH
  c.data.resolution = v['res']
  c.data.global_batch = 64
  c.data.random_flip = False  # latents are cached
  c.autoencoder.preset = 'sd3'
  c.model.update(
    kind='mmdit',
    patch_size=2,
    hidden_size=1536,
    depth=24,
    num_heads=24,
    mlp_ratio=4.0,
    context_dim=4096,
    context_len=333,
    pooled_dim=2048,
    qk_norm=False,
    pos_embed_max_size=192,
    pos_embed_base_size=64,  # sample_size 128 // patch 2
    dtype='bfloat16',
    remat=True,
  )
  c.diffusion.update(formulation='flow_ot', timesteps='logit_normal', logit_mean=0.0, logit_std=1.0, shift=3.0)
  c.optim.update(lr=1e-5, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999)
  c.lpl.enabled = v['lpl']
  c.lpl.chunk = 1
  c.sample.update(sampler='euler', steps=28, guidance=7.0)
  c.init.required = True
  return c
