"""What the config files share: `base()`, every field of an experiment with its default, the variant grammar, and
the paper's recipe (`paper()`), which `imagenet.py` and `cc12m.py` start from.

Variants are comma-separated tokens, the same grammar in every file:
  pretrain | post           the phase, optionally with the resolution: pretrain256, post512
  lpl                       post-training with the latent perceptual loss
  eps | v | flow            the formulation: DDPM-eps, DDPM-v with zero-terminal SNR, or Flow-OT
"""

import re

import ml_collections

from lpl_jax.train.state import OptimConfig

FORMULATIONS = {'eps': 'ddpm_eps', 'v': 'ddpm_v', 'flow': 'flow_ot'}


def base() -> ml_collections.ConfigDict:
  """Every field of an experiment (docs/configs.md describes each). '' and 0 mean "none", so that every field can
  be overridden from the command line with its type."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.sample_every = 0  # 0: sample grids only at the end
  c.num_sample_images = 16
  c.progress = True

  c.data = ml_collections.ConfigDict(
    dict(
      source='embedded',  # 'embedded' | 'folder:PATH' | 'tfds:NAME' | 'cache:PATH' (latents from lpl_jax.encode)
      split='train',
      data_dir='',
      resolution=256,
      global_batch=256,
      shuffle=True,
      random_flip=True,
      random_crop=False,
      num_samples=0,
      worker_count=0,
      prefetch=4,
      latent_sampling='sample',  # images and caches with std: 'sample' z ~ posterior, or 'mean'
    )
  )
  c.autoencoder = ml_collections.ConfigDict(
    dict(
      preset='sd1',  # the architecture when `weights` is empty (random weights: only with allow_random_weights)
      weights='',  # a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors)
      dtype='float32',
      allow_random_weights=False,
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      kind='mmdit',
      patch_size=2,
      hidden_size=1536,
      depth=28,
      num_heads=24,
      mlp_ratio=4.0,
      num_classes=1000,
      context_dim=0,
      context_len=0,
      pooled_dim=0,  # context_dim > 0: text-conditional (cached text embeddings)
      qk_norm=False,
      modulation='block',  # 'block': a modulation Linear per block (SD3, DiT); 'single': adaLN-single (PixArt-alpha)
      learn_sigma=False,  # DiT: also predict the variance (improved DDPM), as the public DiT checkpoints do
      pos_embed_max_size=0,  # MMDiT: SD3's positions, cropped from a grid of this side (0: positions from 0, as DiT)
      pos_embed_base_size=0,  # with pos_embed_max_size: the grid side SD3 trained at (0: pos_embed_max_size)
      dtype='bfloat16',
      remat=True,
      remat_policy='full',  # with remat: 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'attention_out'
      scan_layers=False,  # the blocks as one nn.scan, params stacked on a leading `layers` axis (fast compiles)
    )
  )
  c.diffusion = ml_collections.ConfigDict(
    dict(
      formulation='ddpm_eps',
      schedule='scaled_linear',
      beta_start=0.00085,
      beta_end=0.012,
      zero_terminal_snr=False,
      timesteps='uniform',
      logit_mean=0.0,
      logit_std=1.0,
      mode_scale=1.29,
      shift=1.0,
      vb_weight=1.0,  # with model.learn_sigma: the weight of the variational bound term (DiT's L_simple + L_vb)
    )
  )
  o = OptimConfig()
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=o.lr,
      warmup_steps=o.warmup_steps,
      decay_steps=o.decay_steps,
      weight_decay=o.weight_decay,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      grad_clip=o.grad_clip,
      ema_decay=o.ema_decay,
      ema_warmup=o.ema_warmup,
      ema_start_step=o.ema_start_step,
    )
  )
  c.lpl = ml_collections.ConfigDict(
    dict(
      enabled=False,
      preset='paper',  # 'paper' or 'reference'; it brings its weight, gate and averaging (docs/lpl.md)
      weight=-1.0,  # -1: the preset's (paper 3.0, reference 1.0)
      gate='',  # '': the preset's ('snr': sigma/alpha <= tau, paper; 'timestep': t < t_threshold, reference)
      tau=-1.0,  # -1: the preset's (5.0 at 256 px, scaled with the resolution)
      t_threshold=-1,  # -1: the preset's (200)
      start_step=0,
      chunk=0,
      normalize='',  # '': the preset's ('batch': Eq. 3's expectation over the batch, paper; 'rows', reference)
      norm_axis='space',  # the paper standardisation per channel over space, or per position over 'channels'
      stats_gradient=False,  # gradient through the prediction's mean/std in that standardisation (docs/lpl.md)
      groups=0,
      remat=True,
      remat_policy='full',  # of the decoder branch, with remat: the names of model.remat_policy
      num_blocks=4,
    )
  )
  c.step = ml_collections.ConfigDict(
    dict(
      label_dropout=0.1,
      accum_steps=1,
      loss_weighting='none',  # 'min_snr' (Hang et al., min_snr_gamma) or 'lpl_variance' (Eq. 15; docs/lpl.md)
      min_snr_gamma=5.0,
      stats_decay=0.99,  # of the running loss variances Eq. 15 reads
      stratify_timesteps=False,  # without LPL, stratify the timesteps by the lpl gate (paired baselines: compare)
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_params=False))
  c.init = ml_collections.ConfigDict(
    dict(
      checkpoint='',  # post-training: a pre-training workdir (or its checkpoints/ folder) to start from
      step=-1,  # -1: its latest checkpoint
      keep_optimizer=False,  # also take its optimizer state (else fresh); params and EMA are always taken
      required=False,  # post-training configs set it: starting without init.checkpoint is then an error
    )
  )
  c.sample = ml_collections.ConfigDict(
    dict(sampler='ddim', steps=50, guidance=1.5, eta=0.0, use_ema=True, spacing='leading')
  )
  # Stop before a diverging step is saved: a loss spike over the running median, a gradient norm over a limit.
  c.guard = ml_collections.ConfigDict(dict(loss_spike=0.0, window=100, max_grad_norm=0.0))  # 0: off
  # Evaluation in the loop: EMA samples against a reference statistics file (python -m lpl_jax.evaluate).
  c.eval = ml_collections.ConfigDict(
    dict(
      every=0,  # 0: off; else every this many steps and at the end
      num_images=1000,
      reference='',  # the statistics file `python -m lpl_jax.evaluate --write_reference` writes
      features='inception',  # 'inception' (FID, needs inception_weights) or 'small_domain' (the embedded photographs)
      inception_weights='',  # pytorch-fid's pt_inception-2015-12-05 .pth (a local file)
      batch_size=0,  # images per sampling call over all devices (0: data.global_batch)
      keep_best=True,  # keep the EMA params of the best evaluation as checkpoints/best
    )
  )
  # A jax.profiler trace of steps [start_step, start_step + num_steps) in <workdir>/profile (0 steps: off).
  c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0, all_processes=False))
  return c


def parse_variant(arg: str | None, *, phase: str, res: int) -> dict:
  """`'post512,lpl,v'` -> `{'phase': 'post', 'res': 512, 'lpl': True, 'formulation': 'v'}`; `phase` and `res` are
  the file's defaults, the formulation defaults to eps."""
  out = dict(phase=phase, res=res, lpl=False, formulation='eps')
  for token in filter(None, (arg or '').split(',')):
    m = re.fullmatch(r'(pretrain|post)(\d*)', token)
    if m:
      out['phase'] = m.group(1)
      out['res'] = int(m.group(2)) if m.group(2) else out['res']
    elif token == 'lpl':
      out['lpl'] = True
    elif token in FORMULATIONS:
      out['formulation'] = token
    else:
      raise ValueError(
        f'unknown config variant token {token!r} in {arg!r}; expected pretrain[<res>], post[<res>], '
        'lpl, eps, v or flow.'
      )
  if out['phase'] == 'pretrain' and out['lpl']:
    raise ValueError('pre-training runs without LPL (use post,lpl).')
  return out


def set_formulation(c: ml_collections.ConfigDict, name: str) -> None:
  """The paper's setting for each formulation (section 4.1): DDPM with the quadratic schedule; v with zero-terminal
  SNR, sampled from the last timestep ('trailing' grid, Lin et al. 2024, section 3.3); flows with the OT path, SD3's
  mode sampling and the Euler sampler."""
  c.diffusion.formulation = FORMULATIONS[name]
  c.diffusion.zero_terminal_snr = name == 'v'
  c.sample.spacing = 'trailing' if name == 'v' else 'leading'
  if name == 'flow':
    c.diffusion.timesteps = 'mode'
    c.sample.sampler = 'euler'


PAPER_STEPS = {('pretrain', 256): 600_000, ('post', 256): 200_000, ('post', 512): 120_000}


def paper(v: dict) -> ml_collections.ConfigDict:
  """The paper's recipe for a parsed variant `v`; the config files add their data and conditioning. Which values
  the paper states and which were chosen here: see the docstrings of imagenet.py and cc12m.py."""
  if (v['phase'], v['res']) not in PAPER_STEPS:
    raise ValueError(
      f'no paper run for phase {v["phase"]!r} at {v["res"]} px: pre-training is at 256 px, '
      'post-training at 256 or 512 px.'
    )
  c = base()
  c.total_steps = PAPER_STEPS[v['phase'], v['res']]
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.sample_every = 10_000
  c.data.resolution = v['res']
  c.data.global_batch = 256  # 16 per GPU x 16 GPUs (Table 7)
  # The main results (Tables 2-3) use the asymmetric autoencoder x1.5 of Zhu et al. 2023 (section 4.1 and its
  # footnote); the ablations SDXL's (--config.autoencoder.preset=sdxl). The preset is the architecture when no
  # weights are named (shapes, lowering); a weights folder brings its own config.
  c.autoencoder.preset = 'asymmetric_x1_5'
  c.model.kind = 'mmdit'  # 28 blocks, width 1536 (base())
  c.model.dtype = 'bfloat16'
  c.model.remat = True
  c.model.scan_layers = True  # one scanned block: the step compiles 5x faster (docs/performance.md), same function
  c.model.remat_policy = 'full'  # fits 32 GiB per device at 16 rows; the dots policies do not (docs/performance.md)
  set_formulation(c, v['formulation'])
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1_000 if v['phase'] == 'pretrain' else 0
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.99975 if v['lpl'] else 0.9999
  c.lpl.enabled = v['lpl']  # the paper preset: w_lpl 3.0, sigma/alpha <= 5 at 256 px (scaled), Eq. 3's averaging
  c.lpl.chunk = 1  # one row at a time through the decoder: bounded memory, same FLOPs (benchmarks/lpl_overhead.py)
  c.lpl.remat_policy = 'dots_saveable'  # keeps the decoder's convolutions: -13% step FLOPs, no more memory
  c.sample.steps = 50
  c.sample.guidance = 1.5 if v['res'] == 256 else 2.0
  c.init.required = v['phase'] == 'post'
  return c
