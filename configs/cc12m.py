"""CC12M, text-conditional on cached text embeddings: the paper's Table 2 (CC12M rows).

  --config=configs/cc12m.py:post256[,lpl]     post-training at 256 px, 200k iterations, without/with LPL
  --config=configs/cc12m.py:post512[,lpl]     post-training at 512 px, 120k iterations, without/with LPL
  --config=configs/cc12m.py:pretrain256       a text-conditional pre-training on CC12M (see below)

Data: a latent cache with text embeddings, `--config.data.source=cache:PATH`, written by `python -m lpl_jax.encode`
from CC12M images and captions embedded by the text encoder of your choice (`LatentCacheWriter.add(text=...)`).
Post-training needs `--config.init.checkpoint=<pre-training workdir>`.

From the paper: post-training lengths, EMA, w_lpl, tau, sampling as in configs/imagenet.py; captions re-generated
with Florence-2. The paper post-trains every dataset from the same ImageNet-256 pre-training, which is
class-conditional; its text conditioning is not described further. Chosen here: the MMDiT (28 blocks, width 1536)
reads precomputed text embeddings, 77 tokens x 4096 (T5-XXL-sized; set model.context_len/context_dim to your
cache), no pooled embedding; `pretrain256` pre-trains the same text model on CC12M so that post-training has a
compatible checkpoint.
"""

from configs import common

VARIANTS = ('pretrain256', 'post256', 'post256,lpl', 'post512', 'post512,lpl')


def get_config(arg=None):
  v = common.parse_variant(arg, phase='post', res=256)
  if v['formulation'] != 'eps':
    raise ValueError('the CC12M experiments of the paper use DDPM-eps.')
  c = common.paper(v)  # the recipe every paper config shares (configs/common.py)
  c.data.source = 'cache:'  # set --config.data.source=cache:PATH
  c.data.random_flip = False  # latents are cached; flips would need re-encoding
  c.model.context_dim = 4096
  c.model.context_len = 77
  return c
