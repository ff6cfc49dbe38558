"""Diffusion formulations (DDPM-eps/v/x0 with an optional learned variance, Flow-OT), schedules, timestep samplers,
compiled samplers, and images from a denoiser and a decoder (`generate`)."""

from lpl_jax.diffusion.formulations import (
  FORMULATIONS,
  Formulation,
  discretized_gaussian_log_likelihood,
  get_formulation,
  learned_range_log_variance,
  normal_kl,
  posterior_mean_variance,
)
from lpl_jax.diffusion.generate import GenerateFn, SamplerSettings, generate, make_generate_fn, padded_batches, to_uint8
from lpl_jax.diffusion.samplers import (
  SAMPLERS,
  SPACINGS,
  classifier_free_guidance,
  ddim_step,
  ddpm_step,
  ddpm_timesteps,
  flow_sigmas,
  sample,
)
from lpl_jax.diffusion.schedules import SCHEDULES, get_betas, get_schedule, rescale_zero_terminal_snr
from lpl_jax.diffusion.timesteps import TimestepSampler, resolution_shift, shift_time

__all__ = [
  'FORMULATIONS',
  'SAMPLERS',
  'SCHEDULES',
  'SPACINGS',
  'Formulation',
  'GenerateFn',
  'SamplerSettings',
  'TimestepSampler',
  'classifier_free_guidance',
  'ddim_step',
  'ddpm_step',
  'ddpm_timesteps',
  'discretized_gaussian_log_likelihood',
  'flow_sigmas',
  'generate',
  'get_betas',
  'get_formulation',
  'get_schedule',
  'learned_range_log_variance',
  'make_generate_fn',
  'normal_kl',
  'padded_batches',
  'posterior_mean_variance',
  'rescale_zero_terminal_snr',
  'resolution_shift',
  'sample',
  'shift_time',
  'to_uint8',
]
