"""`LPLConfig`: every switch of the latent perceptual loss, and the two presets `paper` and `reference`.

The presets differ in the ways listed in docs/lpl.md; every field can be overridden:
`LPLConfig.from_preset('paper', num_blocks=3, tau=4.0)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lpl_jax.models.layers import REMAT_POLICIES

NORMALIZATIONS = ('paper', 'shared', 'default', 'none')
NORM_AXES = ('space', 'channels')
DEPTH_WEIGHTS = ('inverse_upscale', 'power_law', 'uniform')
DISTANCES = ('l2', 'l1')
REDUCTIONS = ('sum', 'mean')
MASK_SOURCES = ('pred', 'target')
GATES = ('snr', 'timestep', 'none')
SPACES = ('features', 'image')


@dataclasses.dataclass(frozen=True)
class LPLConfig:
  """The loss, fully specified.

  Attributes:
    num_blocks: decoder up blocks to run; the taps are `[mid, up_0, ..., up_{num_blocks-1}]` (indices 0..num_blocks).
    layers: tap indices that enter the loss; `None` = all taps computed.
    outlier_removal: mask outliers (Algorithm 1) on `outlier_layers`.
    outlier_layers: tap indices that get outlier masks (those not computed are ignored).
    mask_source: compute the mask from the `'pred'`icted features (paper) or the `'target'` (reference).
    quant, margin_std, opening, closing: Algorithm 1's parameters (kernels before the per-layer down factor).
    approx_top_k: quantiles with `lax.approx_max_k` (TPU); `approx_recall` is its recall target.
    normalization: `'paper'` (per-channel standardisation over unmasked positions with the prediction's statistics,
      for both tensors), `'shared'` (both divided by the target's channel L2 norm, eps 1e-6), `'default'` (each by
      its own channel L2 norm, eps 1e-10, as LPIPS), `'none'`.
    norm_axis: what the `'paper'` standardisation reduces over: `'space'` (each channel over its positions, section
      3.2) or `'channels'` (each position over its channels, Eq. 3's wording and LPIPS). The other normalisations
      work on channel vectors and ignore it.
    stats_gradient: let the gradient flow through the prediction's mean and std in the `'paper'` standardisation.
      Off by default: through them the loss rewards inflating the prediction's feature variance (docs/lpl.md).
    distance: `'l2'` (squared error) or `'l1'`.
    depth_weights: `'inverse_upscale'` (first used tap's resolution / this tap's), `'power_law'` (2^-min(i, 3) for
      tap i), `'uniform'`; `layer_weights` (one per used tap) overrides it.
    reduction: `'sum'` over layers (paper) or `'mean'` (reference).
    apply_post_quant_conv: run the autoencoder's post_quant_conv before the decoder (paper: yes; reference: no).
    space: `'features'`, or `'image'` (decode both latents to RGB and compare: the paper's ablation).
    weight: w_lpl in `total = L_diff + weight * L_lpl`.
    gate: which samples get the loss: `'snr'` (sigma_t / alpha_t <= tau, scaled by resolution), `'timestep'`
      (t < t_threshold, the reference), `'none'`.
    tau, t_threshold: the thresholds of the gates.
    base_resolution: resolution at which `tau` and the morphology kernels are specified. With
      `scale_with_resolution`, at resolution r the threshold is `tau * r / base_resolution` and, for r above the base,
      the kernels grow by the same factor (kept odd) (paper section 4.1).
    remat: rematerialise the prediction branch per decoder block.
    remat_policy: with `remat`, what a decoder block keeps for the backward pass, one of the denoisers' policies
      (`lpl_jax.models.layers.REMAT_POLICIES`): `'full'` (nothing), `'dots_saveable'` (every convolution and matrix
      product), `'dots_with_no_batch_dims_saveable'` (matrix products without batch dimensions: in this decoder only
      the mid block's attention projections; convolutions are recomputed), `'attention_out'` (only outputs named
      so: none in this decoder, whose attention is its own; the same as `'full'` here).
  """

  num_blocks: int = 4
  layers: tuple[int, ...] | None = None
  outlier_removal: bool = True
  outlier_layers: tuple[int, ...] = (2, 3, 4)
  mask_source: str = 'pred'
  quant: float = 0.02
  margin_std: float = 2.0
  opening: int = 5
  closing: int = 3
  approx_top_k: bool = False
  approx_recall: float = 0.95
  normalization: str = 'paper'
  norm_axis: str = 'space'
  stats_gradient: bool = False
  distance: str = 'l2'
  depth_weights: str = 'inverse_upscale'
  layer_weights: tuple[float, ...] | None = None
  reduction: str = 'sum'
  apply_post_quant_conv: bool = True
  space: str = 'features'
  weight: float = 3.0
  gate: str = 'snr'
  tau: float = 5.0
  t_threshold: int = 200
  base_resolution: int = 256
  scale_with_resolution: bool = True
  remat: bool = True
  remat_policy: str = 'full'

  def __post_init__(self):
    for name, allowed in (
      ('normalization', NORMALIZATIONS),
      ('norm_axis', NORM_AXES),
      ('depth_weights', DEPTH_WEIGHTS),
      ('distance', DISTANCES),
      ('reduction', REDUCTIONS),
      ('mask_source', MASK_SOURCES),
      ('gate', GATES),
      ('space', SPACES),
      ('remat_policy', REMAT_POLICIES),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f'LPLConfig.{name}={getattr(self, name)!r}; expected one of {allowed}.')
    if self.num_blocks < 0:
      raise ValueError(f'LPLConfig.num_blocks must be >= 0, got {self.num_blocks}.')
    for name in ('layers', 'outlier_layers', 'layer_weights'):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(value))
    if self.layers is not None:
      if not self.layers or len(set(self.layers)) != len(self.layers):
        raise ValueError(f'LPLConfig.layers={self.layers}: give distinct tap indices, or None for all.')
      bad = [i for i in self.layers if not 0 <= i <= self.num_blocks]
      if bad:
        raise ValueError(
          f'LPLConfig.layers contains {bad}: with num_blocks={self.num_blocks} the decoder gives '
          f'taps 0..{self.num_blocks}.'
        )
    if any(i < 0 for i in self.outlier_layers):
      raise ValueError(f'LPLConfig.outlier_layers={self.outlier_layers}: tap indices are >= 0.')
    if self.layer_weights is not None and len(self.layer_weights) != len(self.used_layers):
      raise ValueError(
        f'LPLConfig.layer_weights has {len(self.layer_weights)} entries for '
        f'{len(self.used_layers)} used taps {self.used_layers}.'
      )
    if not 0 <= self.quant < 0.5:
      raise ValueError(f'LPLConfig.quant must be in [0, 0.5), got {self.quant}.')
    if self.margin_std < 0:
      raise ValueError(f'LPLConfig.margin_std must be >= 0, got {self.margin_std}.')
    if self.opening < 1 or self.closing < 1:
      raise ValueError(f'LPLConfig kernel sizes must be >= 1, got opening={self.opening}, closing={self.closing}.')
    if not 0 < self.approx_recall <= 1:
      raise ValueError(f'LPLConfig.approx_recall must be in (0, 1], got {self.approx_recall}.')
    if self.tau <= 0 or self.base_resolution <= 0:
      raise ValueError(f'LPLConfig.tau and base_resolution must be positive, got {self.tau}, {self.base_resolution}.')
    if self.weight < 0:
      raise ValueError(f'LPLConfig.weight must be >= 0, got {self.weight}.')

  @property
  def used_layers(self) -> tuple[int, ...]:
    return tuple(range(self.num_blocks + 1)) if self.layers is None else self.layers

  @property
  def deepest_block(self) -> int:
    """How many up blocks must run: only as deep as the deepest used tap."""
    return max(self.used_layers)

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> LPLConfig:
    if name not in PRESETS:
      raise ValueError(f'unknown LPL preset {name!r}; known: {sorted(PRESETS)}.')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f'LPLConfig has no field(s) {unknown}; fields are {sorted(fields)}.')
    return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, LPLConfig] = {
  # The paper's text (sections 3.2, 4.1, 4.3, appendix A.3) and post-training defaults.
  'paper': LPLConfig(
    num_blocks=4,
    outlier_removal=True,
    outlier_layers=(2, 3, 4),
    mask_source='pred',
    normalization='paper',
    norm_axis='space',
    stats_gradient=False,
    distance='l2',
    depth_weights='inverse_upscale',
    reduction='sum',
    apply_post_quant_conv=True,
    weight=3.0,
    # The paper's best tau lies between 3 and 6 at 256 px (Figure 6) without a single stated value; 5 keeps
    # about 80% of uniformly drawn timesteps under the SD quadratic schedule.
    gate='snr',
    tau=5.0,
  ),
  # The public PyTorch reference (diffusers research project "lpl"), its recommended starting point.
  'reference': LPLConfig(
    num_blocks=4,
    outlier_removal=True,
    outlier_layers=(2, 3, 4),
    mask_source='target',
    normalization='shared',
    distance='l2',
    depth_weights='power_law',
    reduction='mean',
    apply_post_quant_conv=False,
    weight=1.0,
    gate='timestep',
    t_threshold=200,
    scale_with_resolution=False,
  ),
}
