"""Noise schedules of discrete-time diffusion: `alphas_cumprod [T]` (alpha_bar_t), as diffusers computes them."""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ('scaled_linear', 'linear', 'cosine')


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021 (diffusers' "squaredcos_cap_v2"): alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array(
    [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)], np.float32
  ).astype(np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero SNR (pure noise)
  while the first keeps its value; used by the paper for every velocity model."""
  alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
  first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return 1.0 - alphas


def get_betas(
  name: str,
  *,
  num_steps: int = 1000,
  beta_start: float = 0.00085,
  beta_end: float = 0.012,
  zero_terminal_snr: bool = False,
) -> np.ndarray:
  """Per-step betas `[T]` (float64). The linear ones are made in float32 exactly as diffusers does, then widened, so
  the schedules are diffusers' up to its later float32 rounding."""
  if num_steps < 2:
    raise ValueError(f'a schedule needs at least 2 steps, got num_steps={num_steps}.')
  if name == 'scaled_linear':  # the LDM/SD "quadratic" schedule
    betas = (np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float32) ** 2).astype(np.float64)
  elif name == 'linear':
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float32).astype(np.float64)
  elif name == 'cosine':
    betas = _cosine_betas(num_steps)
  else:
    raise ValueError(f'unknown schedule {name!r}; known: {SCHEDULES}.')
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f'schedule {name!r} with beta_start={beta_start}, beta_end={beta_end} has betas outside (0, 1).')
  return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def get_schedule(
  name: str,
  *,
  num_steps: int = 1000,
  beta_start: float = 0.00085,
  beta_end: float = 0.012,
  zero_terminal_snr: bool = False,
) -> np.ndarray:
  """`alphas_cumprod [T]` (float64 NumPy): alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]).

  Args:
    name: `'scaled_linear'` (the paper's quadratic schedule, beta 0.00085 -> 0.012), `'linear'`, `'cosine'`.
    num_steps: T, the number of training timesteps.
    beta_start, beta_end: endpoints for the linear schedules.
    zero_terminal_snr: rescale so that alphas_cumprod[T-1] == 0 (Lin et al. 2024).
  """
  betas = get_betas(
    name, num_steps=num_steps, beta_start=beta_start, beta_end=beta_end, zero_terminal_snr=zero_terminal_snr
  )
  return np.cumprod(1.0 - betas)
