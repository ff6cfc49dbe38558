"""What the loop reports: scalars to `metrics.jsonl` and TensorBoard event files (process 0 only), throughput, a
progress bar; the stop on a non-finite loss and the divergence guard; and a history that reads the same after any
sequence of restarts.

A run's history is the workdir's `metrics.jsonl`, `tensorboard/` and `samples/`. A resumed run starts from its
checkpoint's step, so whatever was logged after that step is about to be logged again: `open_history` drops those
rows from `metrics.jsonl` and has TensorBoard purge them (tensorboardX's `purge_step`). A run that starts from step 0
in a workdir with a history (its checkpoints were deleted) moves the old history to `previous/<UTC time>/`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import statistics
import time
from typing import Any

import jax
from etils import epath

from lpl_jax.train import files, perf
from lpl_jax.train.errors import DivergenceGuardError, NonFiniteLossError, non_finite

log = logging.getLogger(__name__)

# The terms whose non-finite value stops a run.
WATCHED = ('loss/total', 'loss/diffusion', 'loss/lpl', 'grad_norm')
METRICS_FILE = 'metrics.jsonl'
HISTORY = (METRICS_FILE, 'tensorboard', 'samples')
PREVIOUS = 'previous'


def _rows(workdir: str) -> list[str]:
  text = files.read_text(os.path.join(workdir, METRICS_FILE))
  return [line + '\n' for line in (text or '').splitlines() if line.strip()]


def logged_steps(workdir: str) -> list[int]:
  """The steps of `<workdir>/metrics.jsonl` (local or remote), in file order."""
  return [json.loads(line)['step'] for line in _rows(workdir)]


def open_history(workdir: str, start: int, *, resumed: bool) -> int | None:
  """Makes the history of `workdir` end where the run starts (process 0); returns TensorBoard's purge step.

  Args:
    start: the step the run starts from.
    resumed: whether it resumed from the workdir's own checkpoint (else it starts a new history at `start`).

  Returns:
    `start + 1` when resumed (events from that step on are hidden by TensorBoard), else None.
  """
  if jax.process_index() != 0:
    return start + 1 if resumed else None
  root = epath.Path(workdir)
  if resumed:
    lines = _rows(workdir)
    kept = [line for line in lines if json.loads(line)['step'] <= start]
    if len(kept) < len(lines):
      files.write_text(root / METRICS_FILE, ''.join(kept))
      log.info('resuming at step %d: dropped %d rows logged after it from %s', start, len(lines) - len(kept), workdir)
    return start + 1
  old = [name for name in HISTORY if (root / name).exists()]
  if old:
    previous = root / PREVIOUS / time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    for name in old:
      files.move_tree(root / name, previous / name)
    log.warning(
      'workdir %s has a history (%s) but no checkpoint to resume from: starting a new one at step %d; the old one '
      'is in %s.',
      workdir,
      ', '.join(old),
      start,
      previous,
    )
  return None


class MetricWriter:
  """Scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/` (tensorboardX), local or remote (remote
  files are rewritten whole when flushed: `files.GrowingFile`); a no-op off process 0.

  Args:
    purge_step: TensorBoard hides the events logged from this step on by earlier writers (a resumed run).
  """

  def __init__(self, workdir: str, *, purge_step: int | None = None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # heavy: imported where metrics are written

    if files.is_remote(workdir):
      files.register_tensorboard(workdir.split('://', 1)[0])
    self._jsonl = files.GrowingFile(os.path.join(workdir, METRICS_FILE))
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge_step)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write((json.dumps({'step': step, **scalars}) + '\n').encode())
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Guard:
  """The divergence guard, on the host, on every step's metrics (off when both limits are 0).

  A spike is judged on `loss/diffusion`, not `loss/total`: the total jumps by design when LPL switches on at
  `lpl.start_step`. The running median needs a full `window` of steps of this process's run before it judges.

  Args:
    loss_spike: stop when `loss/diffusion` exceeds this multiple of the median of the previous `window` steps.
    window: the running median's length.
    max_grad_norm: stop when `grad_norm` (before clipping) exceeds it.
  """

  def __init__(self, loss_spike: float = 0.0, window: int = 100, max_grad_norm: float = 0.0):
    self.loss_spike, self.max_grad_norm = loss_spike, max_grad_norm
    self._recent: collections.deque[float] = collections.deque(maxlen=window)

  def check(self, step: int, scalars: dict[str, float]) -> None:
    """Raises `DivergenceGuardError` when step `step`'s metrics trip a limit."""
    grad = scalars.get('grad_norm')
    if self.max_grad_norm > 0 and grad is not None and grad > self.max_grad_norm:
      raise DivergenceGuardError(
        step, {'grad_norm': grad}, f'grad_norm = {grad:.4g} is over guard.max_grad_norm = {self.max_grad_norm:g}'
      )
    loss = scalars.get('loss/diffusion')
    if self.loss_spike <= 0 or loss is None:
      return
    if len(self._recent) == self._recent.maxlen:
      median = statistics.median(self._recent)
      if loss > self.loss_spike * median:
        raise DivergenceGuardError(
          step,
          {'loss/diffusion': loss},
          f'loss/diffusion = {loss:.4g} is {loss / median:.3g} x the median {median:.4g} of the previous '
          f'{len(self._recent)} steps (guard.loss_spike = {self.loss_spike:g})',
        )
    self._recent.append(loss)


class MetricLogger:
  """Reads every step's metrics from the device, stops on a non-finite loss or a tripped guard, and on log steps
  writes them with the throughput since the previous log step (`perf.throughput`) and updates the progress bar.

  Args:
    workdir: where `metrics.jsonl` and `tensorboard/` go.
    start, total: the first step of this process's run and the last one (progress bar).
    progress: show a progress bar (process 0 only).
    guard: the divergence guard (None: only non-finite metrics stop the run).
    purge_step: see `MetricWriter`.
    cost: the compiled step's FLOPs and memory; its once-per-run figures (compile time, memory) go into the first
      row written.
    peak_tflops: the device's bf16 peak, for `perf/mfu` (None: not logged).
  """

  def __init__(
    self,
    workdir: str,
    *,
    start: int,
    total: int,
    progress: bool,
    guard: Guard | None = None,
    purge_step: int | None = None,
    cost: perf.CompiledCost | None = None,
    peak_tflops: float | None = None,
  ):
    self.writer = MetricWriter(workdir, purge_step=purge_step)
    self.last: dict[str, float] = {}  # the last written
    self.recorded: tuple[int, dict[str, float]] | None = None  # the last checked, written or not
    self._guard = guard
    self._cost, self._peak = cost, peak_tflops
    self._once = cost.metrics() if cost is not None else {}
    # Throughput counts the steps whose metrics were read: reading waits for the device, so the time between two
    # written rows is the device time of the steps read in between (whatever the dispatch was ahead).
    self._t0, self._rows, self._steps, self._paused, self._per_step = time.perf_counter(), 0, 0, 0.0, 0
    self._bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, desc='train', dynamic_ncols=True)

  def count(self, rows: int) -> None:
    """One more step dispatched, of `rows` images (the global batch)."""
    self._per_step = rows
    if self._bar is not None:
      self._bar.update(1)

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (sample grids, evaluation) is left out of the step time."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t0

  def record(self, step: int, metrics: dict[str, Any], *, write: bool) -> None:
    """Checks step `step`'s metrics (waits for the device) and, when `write`, logs them."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self._steps += 1
    self._rows += self._per_step
    bad = non_finite(scalars, WATCHED)
    if bad:
      raise NonFiniteLossError(step, bad)
    if self._guard is not None:
      self._guard.check(step, scalars)
    self.recorded = (step, scalars)
    if not write:
      return
    seconds = time.perf_counter() - self._t0 - self._paused
    scalars = dict(scalars)  # `recorded` keeps the step's own metrics
    scalars |= perf.throughput(self._cost, seconds=seconds, steps=self._steps, images=self._rows, peak=self._peak)
    if 'lpl/rows_fraction' in scalars:
      scalars['perf/lpl_rows_fraction'] = scalars['lpl/rows_fraction']
    scalars |= self._once
    self._once = {}
    self._t0, self._rows, self._steps, self._paused = time.perf_counter(), 0, 0, 0.0
    self.writer.write(step, scalars)
    self.last = scalars
    if self._bar is not None:
      self._bar.set_postfix(
        loss=f'{scalars["loss/total"]:.4f}',
        lpl=f'{scalars.get("loss/lpl", 0.0):.4f}',
        img_s=f'{scalars.get("perf/images_per_s", 0.0):.1f}',
      )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self.writer.close()
