"""What the loop reports: scalars to `metrics.jsonl` and TensorBoard event files (process 0 only), throughput,
a progress bar, and the stop on a non-finite loss."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from lpl_jax.train.errors import NonFiniteLossError, non_finite

# The terms whose non-finite value stops a run.
WATCHED = ('loss/total', 'loss/diffusion', 'loss/lpl', 'grad_norm')


class MetricWriter:
  """Scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/` (tensorboardX); a no-op off process 0."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # heavy: imported where metrics are written

    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # closed in close()
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class MetricLogger:
  """Reads a step's metrics from the device, stops on a non-finite loss, and on log steps writes them with the
  images per second since the previous log step and updates the progress bar.

  Args:
    workdir: where `metrics.jsonl` and `tensorboard/` go.
    checkpoints: named in the non-finite error (the last checkpoint there predates the failing step).
    start, total: the first step of this process's run and the last one (progress bar).
    progress: show a progress bar (process 0 only).
  """

  def __init__(self, workdir: str, *, checkpoints: str, start: int, total: int, progress: bool):
    self.writer = MetricWriter(workdir)
    self.last: dict[str, float] = {}
    self._checkpoints = checkpoints
    self._t0, self._rows = time.perf_counter(), 0
    self._bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, desc='train', dynamic_ncols=True)

  def count(self, rows: int) -> None:
    """`rows` more images went through a step."""
    self._rows += rows
    if self._bar is not None:
      self._bar.update(1)

  def record(self, step: int, metrics: dict[str, Any], *, write: bool) -> None:
    """Checks step `step`'s metrics (waits for the device) and, when `write`, logs them."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = non_finite(scalars, WATCHED)
    if bad:
      raise NonFiniteLossError(step, bad, checkpoints=self._checkpoints)
    if not write:
      return
    dt = time.perf_counter() - self._t0
    scalars['img_per_s'] = self._rows / dt if dt > 0 else 0.0
    self._t0, self._rows = time.perf_counter(), 0
    self.writer.write(step, scalars)
    self.last = scalars
    if self._bar is not None:
      self._bar.set_postfix(
        loss=f'{scalars["loss/total"]:.4f}',
        lpl=f'{scalars.get("loss/lpl", 0.0):.4f}',
        img_s=f'{scalars["img_per_s"]:.1f}',
      )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self.writer.close()
