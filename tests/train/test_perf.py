"""What the loop reports of a step's cost: XLA's FLOPs and memory of a compiled program against hand counts, the
device peaks, the throughput arithmetic, and the memory check of the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lpl_jax.train import build, perf, sharding
from lpl_jax.train.config import ConfigError
from tests.run import common


def test_compiled_cost_of_a_sharded_matmul_is_per_device():
  """[n, n] @ [n, n] with the rows over the devices: 2 n^3 / devices FLOPs each; the arguments are a row block of
  the first matrix and all of the second, the output a row block."""
  n, devices = 256, jax.devices()
  mesh = Mesh(np.asarray(devices), ('d',))
  rows = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P('d')))
  full = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P()))
  cost = perf.compiled_cost(jax.jit(jnp.matmul).lower(rows, full).compile(), compile_s=1.5)
  k = len(devices)
  assert cost.flops == pytest.approx(2 * n**3 / k, rel=1e-6)
  assert cost.argument_bytes == 4 * (n * n // k + n * n) and cost.output_bytes == 4 * n * n // k
  assert cost.peak_bytes == cost.argument_bytes + cost.output_bytes - cost.alias_bytes + cost.temp_bytes
  once = cost.metrics()
  assert once['perf/compile_s'] == 1.5 and once['perf/memory_peak_gib'] == cost.peak_bytes / 1024**3


@pytest.mark.parametrize(
  'kind,peak',
  [
    ('TPU v4', 275.0),
    ('TPU v5 lite', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v6 lite', 918.0),
    ('NVIDIA A100-SXM4-80GB', 312.0),
    ('NVIDIA H100 80GB HBM3', 989.0),
    ('NVIDIA H100 PCIe', 756.0),
    ('NVIDIA H200', 989.0),
    ('cpu', None),
  ],
)
def test_peak_of_each_device_kind(kind, peak):
  assert perf.peak_tflops(kind) == peak


def test_throughput_arithmetic():
  cost = perf.CompiledCost(flops=3e12, argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, compile_s=0.0)
  out = perf.throughput(cost, seconds=10.0, steps=5, images=5 * 256, peak=275.0)
  assert out['perf/step_s'] == 2.0 and out['perf/images_per_s'] == 128.0
  assert out['perf/tflops_per_device'] == 1.5 and out['perf/mfu'] == pytest.approx(1.5 / 275.0)
  assert 'perf/mfu' not in perf.throughput(cost, seconds=10.0, steps=5, images=1, peak=None)
  assert perf.throughput(None, seconds=0.0, steps=0, images=0, peak=None) == {}


def test_a_step_that_does_not_fit_stops_naming_what_sizes_it():
  """The check compile_step makes after compiling, with a device limit given (CPUs report none): under it the
  compiled program comes back and runs; over it, the error names the fields that size the step."""
  exp = common.experiment('demo_cpu.py', 'post')
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
  inputs = build.AbstractStep(state=x, state_shardings=None, batch={'latents': x}, ae_params=x)
  fn = jax.jit(lambda state, batch, ae: state @ batch['latents'] + ae)
  compiled, cost = build.compile_step(exp, fn, inputs, mesh, memory_limit=1 << 30)
  ones = np.ones((64, 64), np.float32)
  np.testing.assert_array_equal(compiled(ones, {'latents': ones}, ones), np.full((64, 64), 65.0))
  assert cost.argument_bytes == 3 * 64 * 64 * 4 and cost.compile_s > 0
  message = r'the train step needs .* GiB per device .* data\.global_batch=16 over 1 devices, data\.resolution=32'
  with pytest.raises(ConfigError, match=message):
    build.compile_step(exp, fn, inputs, mesh, memory_limit=cost.peak_bytes - 1)


def test_flops_count_every_trip_of_a_loop_where_xla_counts_one():
  """A scanned matmul: 7 trips of 2 m n k. XLA's cost analysis of the compiled loop counts its body once, which is
  why the loop reports the traced count."""
  m, n, steps = 64, 128, 7
  fn = jax.jit(lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=steps)[0])
  traced = fn.trace(jax.ShapeDtypeStruct((m, n), jnp.float32), jax.ShapeDtypeStruct((n, n), jnp.float32))
  cost = perf.compiled_cost(traced.lower().compile(), flops=perf.jaxpr_flops(traced.jaxpr))
  assert cost.flops == steps * 2 * m * n * n
  assert cost.xla_flops == pytest.approx(2 * m * n * n, rel=1e-3)


def test_flops_of_a_cond_and_of_a_shard_map_per_device():
  """The costlier branch of a cond; a shard_map body at its per-device shapes, on every device."""
  k = len(jax.devices())
  mesh = Mesh(np.asarray(jax.devices()), ('d',))
  per_device = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P('d'), P()), out_specs=P('d'))
  a, b = jax.ShapeDtypeStruct((8 * k, 128), jnp.float32), jax.ShapeDtypeStruct((128, 32), jnp.float32)
  traced = jax.jit(per_device).trace(a, b)
  assert perf.jaxpr_flops(traced.jaxpr, k) == 2 * 8 * 128 * 32
  branchy = jax.jit(lambda p, a, b: jax.lax.cond(p, lambda: (a @ b) @ b.T, lambda: a)).trace(
    jax.ShapeDtypeStruct((), jnp.bool_), a, b
  )
  assert perf.jaxpr_flops(branchy.jaxpr) == 2 * 8 * k * 128 * 32 * 2


@pytest.mark.parametrize('which', ['dit', 'decoder'])
def test_flops_agree_with_xla_on_programs_without_loops(which):
  """Forward and backward of a small DiT and of the tiny decoder, unrolled: the traced count of products and
  convolutions is within 5% of XLA's count of everything (measured: -2.0% and +3.7%)."""
  from lpl_jax import autoencoder as ae
  from lpl_jax import models

  if which == 'dit':
    model = models.DiT(patch_size=2, hidden_size=256, depth=2, num_heads=4, num_classes=10)
    x, t, y = jnp.zeros((8, 16, 16, 4)), jnp.zeros((8,)), jnp.zeros((8,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x, t, y) ** 2)))
  else:
    model = ae.from_preset('tiny')
    params = jax.eval_shape(lambda k: ae.init_params(model, k), jax.random.key(0))
    x = jnp.zeros((2, 8, 8, 4))
    fn = jax.jit(jax.grad(lambda p, z: jnp.sum(model.apply({'params': p}, z, method=model.decode) ** 2)))
  traced = fn.trace(params, x)
  cost = perf.compiled_cost(traced.lower().compile(), flops=perf.jaxpr_flops(traced.jaxpr))
  assert cost.flops == pytest.approx(cost.xla_flops, rel=0.05)
