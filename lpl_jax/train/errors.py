"""The errors a run reports to its user as one line (the entry points print them and exit with status 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping


class ConfigError(ValueError):
  """A config that cannot run, named by its field; raised before anything compiles."""


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a folder, not writable, or held by another run."""


class DivergedError(FloatingPointError):
  """The run stopped because its loss or gradients went bad at `step`; that step is not saved.

  Attributes:
    step: the step whose metrics failed the check.
    terms: the offending metrics and their values.
    reason: what failed, in words.
    checkpoints: what the kept checkpoints hold (set by the train loop once it knows; part of the message).
  """

  def __init__(self, step: int, terms: Mapping[str, float], reason: str):
    super().__init__(step, dict(terms), reason)
    self.step, self.terms, self.reason = step, dict(terms), reason
    self.checkpoints = ''

  def __str__(self) -> str:
    tail = f' {self.checkpoints}' if self.checkpoints else ''
    return f'step {self.step}: {self.reason}; stopping without saving this step.{tail}'


class NonFiniteLossError(DivergedError):
  """A watched metric became NaN or infinite."""

  def __init__(self, step: int, terms: Mapping[str, float]):
    super().__init__(step, terms, ', '.join(f'{k} = {v}' for k, v in dict(terms).items()))


class DivergenceGuardError(DivergedError):
  """The divergence guard tripped: a loss spike over the running median, or a gradient norm over its limit."""


def non_finite(scalars: Mapping[str, float], names: tuple[str, ...] | None = None) -> dict[str, float]:
  """The entries of `scalars` (only `names`, if given) that are NaN or infinite."""
  keys = scalars if names is None else [k for k in names if k in scalars]
  return {k: scalars[k] for k in keys if not math.isfinite(scalars[k])}
