"""ImageNet-1k, class-conditional: the paper's Table 2 (ImageNet rows) and Table 3 (formulations at 512 px).

  --config=configs/imagenet.py:pretrain256            pre-training, DDPM-eps, 600k iterations at 256 px
  --config=configs/imagenet.py:post256[,lpl]          post-training at 256 px, 200k iterations, without/with LPL
  --config=configs/imagenet.py:post512[,lpl]          post-training at 512 px, 120k iterations, without/with LPL
  add `,v` or `,flow` for DDPM-v (zero-terminal SNR) or Flow-OT (Table 3), e.g. `post512,lpl,flow`; the
  pre-training must then use the same formulation (`pretrain256,flow`).
  --config=configs/imagenet.py:post256,dit[,lpl]      post-train the public DiT-XL/2-256 without/with LPL
  --config=configs/imagenet.py:post512,dit[,lpl]      post-train the public DiT-XL/2-512 without/with LPL

The `dit` variants start from Peebles & Xie's weights (`--config.init.checkpoint=` the `DiT-XL-2-256x256.pt` /
`DiT-XL-2-512x512.pt` file of facebookresearch/DiT, or the `transformer` folder of diffusers' facebook/DiT-XL-2-256 /
-512) and keep DiT's own diffusion: DDPM-eps with linear betas 1e-4..2e-2 over 1000 steps, a learned variance
(the hybrid loss L_simple + L_vb), the sd-vae-ft-ema (or -mse) autoencoder with scaling 0.18215, 1000 classes plus
the null class, AdamW at 1e-4 without weight decay, EMA 0.9999, and DiT's evaluation sampler (250 DDPM steps,
guidance 1.5). docs/pretrained.md walks through a run.

Post-training needs `--config.init.checkpoint=<pre-training workdir>`; every run needs
`--config.autoencoder.weights=<diffusers-format folder>`: for Tables 2-3 the asymmetric autoencoder x1.5 of Zhu et
al. 2023 (`AsymmetricAutoencoderKL`, cross-attention/asymmetric-autoencoder-kl-x-1-5, the default preset), for the
ablations SDXL's (`--config.autoencoder.preset=sdxl` and its weights).

From the paper (sections 4.1, 4.3, A): MMDiT denoiser (Esser et al.) with 28 blocks of width 1536; the asymmetric
autoencoder for the main results (SDXL's for ablations), d = 8, C = 4; quadratic ("scaled_linear") beta schedule
0.00085..0.012; pre-training 600k iterations at 256 px; post-training 200k (256 px) or 120k (512 px) iterations; EMA
0.9999 without LPL, 0.99975 with; w_lpl = 3; noise threshold tau between 3 and 6 (5 here); DDIM 50 steps with CFG
1.5 at 256 px and 2.0 at 512 px; v-prediction with zero-terminal SNR; flows with the OT path, SD3's mode sampling
with heavy tails and the Euler sampler; 16 images per GPU with LPL (Table 7).

The paper gives that size as 796M parameters; this two-stream MMDiT has 2.36B. With a modulation shared across
blocks (`--config.model.modulation=single`, adaLN-single) it has 1.59B, and a single-stream DiT with it
(`--config.model.kind=dit`) 811.9M, 2.0% above the paper's figure; none is within 1%, so the default stays the
architecture the paper names (lpl_jax/models/mmdit.py compares the counts).

Not stated in the paper, chosen here: the global batch (256 = 16 per GPU x 16 GPUs, the two A100 nodes of Table 7),
AdamW with lr 1e-4, no weight decay, 1k warmup steps in pre-training, gradient clipping at 1.0, label dropout 0.1
(for CFG), and the ImageNet crop (centred square, horizontal flips).
"""

from configs import common

VARIANTS = tuple(
  [f'pretrain256{f}' for f in ('', ',v', ',flow')]
  + [f'post{res}{lpl}{f}' for res in (256, 512) for lpl in ('', ',lpl') for f in ('', ',v', ',flow')]
  + [f'post{res},dit{lpl}' for res in (256, 512) for lpl in ('', ',lpl')]
)


def get_config(arg=None):
  tokens = [t for t in (arg or '').split(',') if t]
  dit = 'dit' in tokens
  v = common.parse_variant(','.join(t for t in tokens if t != 'dit'), phase='pretrain', res=256)
  c = common.paper(v)  # the recipe every paper config shares (configs/common.py)
  c.data.source = 'tfds:imagenet2012'
  c.data.random_flip = True
  c.model.num_classes = 1000
  if dit:
    public_dit(c, v)
  return c


def public_dit(c, v: dict) -> None:
  """Post-training of the public DiT-XL/2 (Peebles & Xie 2023): its architecture, diffusion and autoencoder."""
  if v['phase'] != 'post' or v['formulation'] != 'eps':
    raise ValueError(
      'the dit variants post-train the public DiT-XL/2, a DDPM-eps model: use post256,dit or post512,dit.'
    )
  c.model.update(kind='dit', patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, learn_sigma=True)
  c.diffusion.update(schedule='linear', beta_start=1e-4, beta_end=0.02, zero_terminal_snr=False, vb_weight=1.0)
  c.autoencoder.preset = 'sd1'  # stabilityai/sd-vae-ft-ema and -mse: the SD 1 architecture, scaling 0.18215
  c.optim.update(lr=1e-4, weight_decay=0.0, ema_decay=0.9999)
  # DiT's evaluation: 250 ancestral steps with the learned variance on its respaced grid, round(i * 999 / 249),
  # which is the 'linspace' spacing; guidance 1.5.
  c.sample.update(sampler='ddpm', steps=250, guidance=1.5, spacing='linspace')
