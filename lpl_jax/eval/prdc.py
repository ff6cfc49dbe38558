"""Precision, recall, density and coverage of generated features against real ones (k-NN manifold estimates).

Definitions (Naeem et al., 2020, with the reference code's `compute_prdc`; precision/recall are Kynkaanniemi et
al.'s). With `d` the Euclidean distance, `NND_k(x)` the distance from `x` to its k-th nearest neighbour in its own set
(itself excluded: the value at index k of the sorted row that includes the zero self-distance), real `X_1..X_N`,
fake `Y_1..Y_M`, and strict inequalities as in the reference code:

  precision = 1/M sum_j 1[exists i: d(X_i, Y_j) < NND_k(X_i)]
  recall    = 1/N sum_i 1[exists j: d(X_i, Y_j) < NND_k(Y_j)]
  density   = 1/(kM) sum_j sum_i 1[d(X_i, Y_j) < NND_k(X_i)]
  coverage  = 1/N sum_i 1[min_j d(X_i, Y_j) < NND_k(X_i)]

The papers use k=3 for precision/recall and k=5 for density/coverage: call twice with those `nearest_k`.

Distances are computed in float32 blocks of `block_size` query rows against the whole other set, so memory is
`block_size * max(N, M)` floats; both sets are first centred on the real mean (distances do not change, the
`|x|^2 + |y|^2 - 2 x.y` expansion loses less to cancellation).

References:
  Naeem, Oh, Uh, Choi, Yoo, 2020, Reliable fidelity and diversity metrics for generative models.
  Kynkaanniemi, Karras, Laine, Lehtinen, Aila, 2019, Improved precision and recall metric for assessing generative
  models.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = 1024
PR_NEAREST_K = 3  # Kynkaanniemi et al.
DC_NEAREST_K = 5  # Naeem et al.


def _pairwise_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """`[n, D], [m, D] -> [n, m]` Euclidean distances (float32, matmul at full precision)."""
  sq = (
    jnp.sum(a * a, axis=1)[:, None]
    + jnp.sum(b * b, axis=1)[None, :]
    - 2.0 * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  )
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def _map_row_blocks(fn, queries: jax.Array, block_size: int):
  """`fn([b, D]) -> pytree of [b, ...]` over row blocks of `queries` (padded, padding dropped), one block at a time."""
  n = queries.shape[0]
  b = min(block_size, n)
  num_blocks = -(-n // b)
  padded = jnp.pad(queries, ((0, num_blocks * b - n), (0, 0)))
  out = jax.lax.map(fn, padded.reshape(num_blocks, b, -1))
  return jax.tree.map(lambda x: x.reshape((num_blocks * b,) + x.shape[2:])[:n], out)


def _kth_neighbour_distances(x: jax.Array, nearest_k: int, block_size: int) -> jax.Array:
  """`[N]` distance of each row to its k-th nearest neighbour in `x`, itself excluded."""

  def block(q):
    # top_k of the negated distances: the k+1 smallest, the row's own zero distance among them.
    return -jax.lax.top_k(-_pairwise_distances(q, x), nearest_k + 1)[0][:, -1]

  return _map_row_blocks(block, x, block_size)


@functools.partial(jax.jit, static_argnames=('nearest_k', 'block_size'))
def _prdc_counts(real: jax.Array, fake: jax.Array, *, nearest_k: int, block_size: int):
  centre = jnp.mean(real, axis=0)
  real, fake = real - centre, fake - centre
  real_radii = _kth_neighbour_distances(real, nearest_k, block_size)
  fake_radii = _kth_neighbour_distances(fake, nearest_k, block_size)

  def fake_block(f):  # [b, N]: which real balls contain each fake sample
    inside = _pairwise_distances(f, real) < real_radii[None, :]
    return jnp.any(inside, axis=1), jnp.sum(inside, axis=1)

  def real_block(r):  # [b, M]
    d = _pairwise_distances(r, fake)
    return jnp.any(d < fake_radii[None, :], axis=1), jnp.min(d, axis=1)

  in_real_manifold, real_balls_count = _map_row_blocks(fake_block, fake, block_size)
  in_fake_manifold, nearest_fake = _map_row_blocks(real_block, real, block_size)
  # Integer counts; the ratios are taken on the host in float64.
  return dict(
    precision=jnp.sum(in_real_manifold),
    recall=jnp.sum(in_fake_manifold),
    density=jnp.sum(real_balls_count),
    coverage=jnp.sum(nearest_fake < real_radii),
  )


def prdc(
  real_features: np.ndarray | jax.Array,
  fake_features: np.ndarray | jax.Array,
  *,
  nearest_k: int,
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, float]:
  """Precision, recall, density and coverage of `fake_features` w.r.t. `real_features` (definitions above).

  Args:
    real_features: `[N, D]` features of real (reference) images.
    fake_features: `[M, D]` features of generated images.
    nearest_k: k of the k-NN radii: 3 for precision/recall, 5 for density/coverage, as in the papers.
    block_size: query rows per distance block (memory is `block_size * max(N, M)` floats).

  Returns:
    `{'precision', 'recall', 'density', 'coverage'}` as Python floats.
  """
  real = jnp.asarray(real_features, jnp.float32)
  fake = jnp.asarray(fake_features, jnp.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'features must be [N, D] and [M, D] with the same D; got {real.shape} and {fake.shape}.')
  if nearest_k < 1:
    raise ValueError(f'nearest_k must be >= 1; got {nearest_k}.')
  for name, x in (('real', real), ('fake', fake)):
    if x.shape[0] < nearest_k + 1:
      raise ValueError(
        f'{x.shape[0]} {name} samples are too few for nearest_k={nearest_k}: the k-th nearest '
        f'neighbour (self excluded) needs at least {nearest_k + 1}.'
      )
  counts = jax.device_get(_prdc_counts(real, fake, nearest_k=nearest_k, block_size=block_size))
  n, m = real.shape[0], fake.shape[0]
  return dict(
    precision=int(counts['precision']) / m,
    recall=int(counts['recall']) / n,
    density=int(counts['density']) / (nearest_k * m),
    coverage=int(counts['coverage']) / n,
  )
