"""An independent PyTorch computation of the LPL `reference` preset, written from the description in docs/lpl.md of the
public reference (diffusers research project "lpl") and the paper's Algorithm 1, on diffusers' own decoder modules.

Used by the parity tests and by benchmarks/bench_lpl.py. NCHW, as PyTorch.
"""

from math import ceil

import torch
import torch.nn.functional as F


def remove_outliers(features, down_f=1, opening=5, closing=3, quant=0.02):
  """Algorithm 1 of the paper (appendix A.3), transcribed; returns (mask, features * mask)."""
  opening = int(ceil(opening / down_f))
  closing = int(ceil(closing / down_f))
  if opening == 2:
    opening = 3
  if closing == 2:
    closing = 1
  feat_flat = features.flatten(-2, -1)
  k1 = int(feat_flat.shape[-1] * quant)
  k2 = int(feat_flat.shape[-1] * (1 - quant))
  q1 = feat_flat.kthvalue(k1, dim=-1).values[..., None, None]
  q2 = feat_flat.kthvalue(k2, dim=-1).values[..., None, None]
  m = 2 * feat_flat.std(-1)[..., None, None].detach()
  mask = (q1 - m < features) * (features < q2 + m)
  mask = F.max_pool2d(mask.float(), kernel_size=closing, stride=1, padding=(closing - 1) // 2)
  mask = (-F.max_pool2d(-mask, kernel_size=opening, stride=1, padding=(opening - 1) // 2)).bool()
  return mask, features * mask


def decoder_taps(vae, z, num_blocks, apply_post_quant_conv=False):
  """The reference's feature taps: `conv_in` on the unscaled latent (skipping post_quant_conv), mid, up blocks."""
  if apply_post_quant_conv and vae.post_quant_conv is not None:
    z = vae.post_quant_conv(z)
  h = vae.decoder.mid_block(vae.decoder.conv_in(z))
  feats = [h]
  for block in vae.decoder.up_blocks[:num_blocks]:
    h = block(h)
    feats.append(h)
  return feats


def reference_lpl(
  vae,
  z0_hat,
  z0,
  *,
  num_blocks=4,
  norm='shared',
  power_law=True,
  remove_outliers_on=True,
  outlier_layers=(2, 3, 4),
  apply_post_quant_conv=False,
):
  """Per-sample LPL [B] of the reference preset, on latents in diffusion (scaled) space."""
  sf = vae.config.scaling_factor
  shift = vae.config.get('shift_factor') or 0.0
  with torch.no_grad():
    target = decoder_taps(vae, z0 / sf + shift, num_blocks, apply_post_quant_conv)
  pred = decoder_taps(vae, z0_hat / sf + shift, num_blocks, apply_post_quant_conv)
  losses = []
  for i, (p, t) in enumerate(zip(pred, target)):
    if remove_outliers_on and i in outlier_layers:
      # The reference's fixed down factors for an SD-style decoder: feature 2 is at half resolution, 3-4 at full.
      mask, t = remove_outliers(t, down_f={2: 2, 3: 1, 4: 1}[i])
      mask = mask.float()
    else:
      mask = torch.ones_like(t)
    if norm == 'shared':
      n = torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-6
      p, t = p / n, t / n
    elif norm == 'default':
      p = p / (torch.sqrt(torch.sum(p**2, dim=1, keepdim=True)) + 1e-10)
      t = t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-10)
    err = (p - t) ** 2 * mask
    layer = (err.sum(dim=(2, 3)) / mask.sum(dim=(2, 3))).mean(dim=1)
    if power_law:
      layer = layer * 2.0 ** -min(i, 3)
    losses.append(layer)
  return sum(losses) / len(losses)


def paper_lpl(vae, z0_hat, z0, *, num_blocks=4, outlier_layers=(2, 3, 4), eps=1e-6, axis='space', stats_gradient=False):
  """Per-sample LPL [B] of the paper's text: eq. 3 with the mask from the PREDICTED features (Algorithm 1, down
  factor = output / layer resolution), standardisation of both tensors with the prediction's mean and (population)
  variance over unmasked entries: per channel over positions (`axis='space'`) or per position over channels
  (`'channels'`), detached unless `stats_gradient`; omega_l = r_first / r_l, masked mean over positions, mean over
  channels, sum over layers; post_quant_conv applied."""
  sf = vae.config.scaling_factor
  shift = vae.config.get('shift_factor') or 0.0
  with torch.no_grad():
    target = decoder_taps(vae, z0 / sf + shift, num_blocks, apply_post_quant_conv=True)
  pred = decoder_taps(vae, z0_hat / sf + shift, num_blocks, apply_post_quant_conv=True)
  image_res = z0.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
  total = 0
  for i, (p, t) in enumerate(zip(pred, target)):
    if i in outlier_layers:
      mask, _ = remove_outliers(p.detach(), down_f=image_res // p.shape[-1])
      mask = mask.float()
    else:
      mask = torch.ones_like(p)
    count = mask.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    dims = (2, 3) if axis == 'space' else (1,)  # NCHW: positions, or channels
    n = mask.sum(dim=dims, keepdim=True).clamp(min=1)
    stats = p if stats_gradient else p.detach()
    mean = (stats * mask).sum(dim=dims, keepdim=True) / n
    var = (((stats - mean) ** 2) * mask).sum(dim=dims, keepdim=True) / n
    p_n, t_n = (p - mean) / torch.sqrt(var + eps), (t - mean) / torch.sqrt(var + eps)
    layer = ((((p_n - t_n) ** 2) * mask).sum(dim=(2, 3)) / count[..., 0, 0]).mean(dim=1)
    total = total + layer * (pred[0].shape[-1] / p.shape[-1])
  return total
