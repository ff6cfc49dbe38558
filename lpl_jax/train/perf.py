"""What a step costs and how fast it runs: the FLOPs and memory of the compiled step, the device's peak, and the
throughput metrics the loop logs (`perf/*`).

FLOPs are counted on the traced step (`jaxpr_flops`): the matrix products and convolutions it executes, the
rematerialised forwards and the LPL branch included (hardware FLOPs, the numerator of utilisation as maxdiffusion
and big_vision report it; MaxText's "model" FLOPs leave remat out), each loop body times its trip count. XLA's cost
analysis of the compiled program cannot be used as it is: it counts a while loop's body once, so a scanned
28-block denoiser, a chunked LPL branch or gradient accumulation would count one block, one chunk, one micro-batch.
It is kept (`xla_flops`), per device, since it is the partitioned program's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.extend

log = logging.getLogger(__name__)

GIB = 1024**3

# Dense bf16 peak TFLOP/s per JAX device, most specific name first: the first entry found in `device.device_kind`
# applies. Vendor figures: Cloud TPU system architecture pages (v4 275, v5e 197, v5p 459, v6e 918, per chip; a v4
# or v5p chip is one JAX device), NVIDIA data sheets without sparsity (A100 312; H100 SXM 989, PCIe 756; H200 989).
PEAK_BF16_TFLOPS = (
  ('TPU v6 lite', 918.0),
  ('TPU v6e', 918.0),
  ('TPU v5 lite', 197.0),
  ('TPU v5e', 197.0),
  ('TPU v5p', 459.0),
  ('TPU v5', 459.0),
  ('TPU v4', 275.0),
  ('H100 PCIe', 756.0),
  ('H100', 989.0),
  ('H200', 989.0),
  ('A100', 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The bf16 peak of a device kind (`jax.devices()[0].device_kind`), None where unknown (CPUs)."""
  for name, tflops in PEAK_BF16_TFLOPS:
    if name in device_kind:
      return tflops
  return None


@dataclasses.dataclass(frozen=True)
class CompiledCost:
  """XLA's account of one compiled step, per device.

  `peak_bytes` = arguments + outputs - aliased (donated buffers reused by the outputs) + temp (the single scratch
  allocation XLA's heap simulation lays out for the scheduled program's intermediates): what the step needs at once,
  without allocator fragmentation or runtime workspace.
  """

  flops: float | None  # per device, from the traced step (`jaxpr_flops`)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  compile_s: float
  xla_flops: float | None = None  # XLA's cost analysis, per device: loop bodies counted once

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def metrics(self) -> dict[str, float]:
    """The once-per-run figures: compile time and memory per device in GiB."""
    out = {
      'perf/compile_s': self.compile_s,
      'perf/memory_argument_gib': self.argument_bytes / GIB,
      'perf/memory_output_gib': self.output_bytes / GIB,
      'perf/memory_temp_gib': self.temp_bytes / GIB,
      'perf/memory_peak_gib': self.peak_bytes / GIB,
    }
    if self.flops:
      out['perf/tflop_per_step_per_device'] = self.flops / 1e12
    return out


def _dot_flops(eqn: Any) -> float:
  """2 x output size x contracted size of a `dot_general`."""
  (contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)


def _conv_flops(eqn: Any) -> float:
  """2 x output size x the kernel's size per output feature (a grouped kernel holds one group's inputs)."""
  kernel = eqn.invars[1].aval.shape
  out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) / kernel[out_feature_dim]


def _sub_jaxprs(value: Any) -> list[Any]:
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, list | tuple):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr: Any, num_devices: int = 1) -> float:
  """FLOPs per device of the matrix products and convolutions of a traced program (`jit(f).trace(...).jaxpr`).

  A `scan` counts its body `length` times, a `cond` its costliest branch (the LPL branch where it is switched on), a
  `while` its body once (its trip count is not static). The program outside `shard_map` has global shapes, spread
  over `num_devices` by the partitioner; a `shard_map` body has per-device shapes and runs on every device.
  Elementwise work (normalisations, activations), a few percent of a transformer step, is left out.
  """
  return _flops(jaxpr.jaxpr if isinstance(jaxpr, jax.extend.core.ClosedJaxpr) else jaxpr, num_devices) / num_devices


def _flops(jaxpr: Any, num_devices: int) -> float:
  """Global FLOPs of `jaxpr` (a `shard_map` body's per-device FLOPs times the devices)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'cond':
      total += max(_flops(b.jaxpr, num_devices) for b in eqn.params['branches'])
    elif name == 'scan':
      total += eqn.params['length'] * _flops(eqn.params['jaxpr'].jaxpr, num_devices)
    elif name == 'shard_map':
      total += num_devices * _flops(eqn.params['jaxpr'], 1)
    else:
      total += sum(_flops(j, num_devices) for v in eqn.params.values() for j in _sub_jaxprs(v))
  return total


def compiled_cost(compiled: Any, compile_s: float = 0.0, *, flops: float | None = None) -> CompiledCost:
  """The cost of a `jax.stages.Compiled` (`jit(f).lower(...).compile()`); `flops` per device from `jaxpr_flops` of
  its trace (None: XLA's count, exact only for a program without loops)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
  xla = float(analysis.get('flops', 0.0)) if analysis else 0.0
  xla = xla if xla > 0 else None
  m = compiled.memory_analysis()
  return CompiledCost(
    flops=xla if flops is None else flops,
    xla_flops=xla,
    argument_bytes=int(m.argument_size_in_bytes),
    output_bytes=int(m.output_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes),
    temp_bytes=int(m.temp_size_in_bytes),
    compile_s=compile_s,
  )


def device_memory_limit(device: Any) -> int | None:
  """Bytes a device can hold, where its backend reports them (GPUs, TPUs); None otherwise (CPUs)."""
  stats = device.memory_stats()
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def throughput(
  cost: CompiledCost | None, *, seconds: float, steps: int, images: int, peak: float | None
) -> dict[str, float]:
  """The `perf/*` metrics of a log interval: `steps` steps of `images` images in all (global) in `seconds`.

  `perf/tflops_per_device` is the compiled step's FLOPs per device over the measured step time; `perf/mfu` divides
  it by the device's bf16 peak (absent where the peak is unknown).
  """
  if seconds <= 0 or steps <= 0:
    return {}
  step_s = seconds / steps
  out = {'perf/step_s': step_s, 'perf/images_per_s': images / seconds}
  if cost is not None and cost.flops:
    tflops = cost.flops / step_s / 1e12
    out['perf/tflops_per_device'] = tflops
    if peak:
      out['perf/mfu'] = tflops / peak
  return out


class ProfileWindow:
  """A `jax.profiler` trace of the steps `[start_step, start_step + num_steps)` (`config.profile`), written to
  `<workdir>/profile` (`plugins/profile/<time>/<host>.xplane.pb`, what TensorBoard's profile plugin and xprof read).

  Process 0 traces, or every process with `all_processes` (each writes its own host's file). A remote workdir gets
  the trace copied from a local folder when the window closes. A run resumed past the window traces nothing.
  """

  def __init__(self, start_step: int, num_steps: int, all_processes: bool, workdir: str):
    self.first, self.end = start_step, start_step + num_steps
    self.enabled = num_steps > 0 and (all_processes or jax.process_index() == 0)
    self.target = os.path.join(workdir, 'profile')
    self._local: str | None = None

  @property
  def active(self) -> bool:
    return self._local is not None

  def annotation(self, step: int) -> Any:
    """The context of step `step`: a named step in the trace while tracing (xprof's step view), else nothing."""
    if self.active:
      return jax.profiler.StepTraceAnnotation('train', step_num=step)
    return contextlib.nullcontext()

  def before(self, step: int) -> None:
    """Starts tracing when step `step` (0-based: the step about to run) opens the window."""
    if self.enabled and step == self.first:
      self._local = self.target if '://' not in self.target else tempfile.mkdtemp(prefix='lpl_profile_')
      jax.profiler.start_trace(self._local)

  def after(self, done: int, outputs: Any) -> None:
    """Stops once `done` steps closed the window, after the device finished `outputs` (dispatch is asynchronous)."""
    if self.active and done >= self.end:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    local, self._local = self._local, None
    if local != self.target:
      from etils import epath

      for path in epath.Path(local).rglob('*'):
        if path.is_file():
          dest = epath.Path(self.target) / path.relative_to(local)
          dest.parent.mkdir(parents=True, exist_ok=True)
          dest.write_bytes(path.read_bytes())
      shutil.rmtree(local, ignore_errors=True)
    log.info('profile of steps %d to %d written to %s', self.first, self.end - 1, self.target)
