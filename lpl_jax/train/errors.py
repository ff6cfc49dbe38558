"""The errors a run reports to its user as one line (the entry points print them and exit with status 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping


class ConfigError(ValueError):
  """A config that cannot run, named by its field; raised before anything compiles."""


class NonFiniteLossError(FloatingPointError):
  """A logged loss term became NaN or infinite: the run stops without saving that step.

  Attributes:
    step: the step whose metrics were not finite.
    terms: the non-finite terms and their values.
  """

  def __init__(self, step: int, terms: Mapping[str, float], *, checkpoints: str | None = None):
    self.step, self.terms = step, dict(terms)
    values = ', '.join(f'{k} = {v}' for k, v in self.terms.items())
    where = f' The checkpoints in {checkpoints} are all from earlier steps.' if checkpoints else ''
    super().__init__(f'step {step}: {values}; stopping without saving this step.{where}')


def non_finite(scalars: Mapping[str, float], names: tuple[str, ...] | None = None) -> dict[str, float]:
  """The entries of `scalars` (only `names`, if given) that are NaN or infinite."""
  keys = scalars if names is None else [k for k in names if k in scalars]
  return {k: scalars[k] for k in keys if not math.isfinite(scalars[k])}
