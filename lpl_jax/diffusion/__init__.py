"""Diffusion formulations (DDPM-eps/v/x0, Flow-OT), schedules, timestep samplers and compiled samplers."""

from lpl_jax.diffusion.formulations import FORMULATIONS, Formulation, get_formulation
from lpl_jax.diffusion.samplers import (
    SAMPLERS,
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
    'FORMULATIONS', 'SAMPLERS', 'SCHEDULES', 'Formulation', 'TimestepSampler', 'classifier_free_guidance',
    'ddim_step', 'ddpm_step', 'ddpm_timesteps', 'flow_sigmas', 'get_betas', 'get_formulation', 'get_schedule',
    'rescale_zero_terminal_snr', 'resolution_shift', 'sample', 'shift_time',
]
