"""Data parallelism over a jax.sharding Mesh of all devices (all processes), and padded evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from cnn_caption.errors import UserError

Batch = dict[str, jax.Array]


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over all devices (all hosts)."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def check_batch_size(batch_size: int, name: str = 'batch_size') -> None:
  n = jax.device_count()
  if batch_size % n:
    raise UserError(f'config.{name}={batch_size} is not divisible by the {n} devices; '
                    f'set --config.{name} to a multiple of {n}')


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0) -> Batch:
  """Global host batch -> arrays sharded along batch_axis over the mesh; each host feeds its rows."""
  spec = P(*([None] * batch_axis), 'data')
  sharding = NamedSharding(mesh, spec)
  pid, nproc = jax.process_index(), jax.process_count()

  def put(x):
    n = x.shape[batch_axis]
    rows = slice(pid * n // nproc, (pid + 1) * n // nproc)
    local = x[(slice(None),) * batch_axis + (rows,)]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def padded_batches(num: int, batch_size: int,
                   fetch: Callable[[slice], dict[str, np.ndarray]]) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """Fixed-size batches over num rows (one compiled shape): the last is zero-padded.

  Yields (batch, num_real): fetch(rows) gives the real rows; `batch['mask']` marks them.
  """
  for start in range(0, num, batch_size):
    real = fetch(slice(start, min(start + batch_size, num)))
    n = len(next(iter(real.values())))
    batch = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) if n < batch_size else v
             for k, v in real.items()}
    batch['mask'] = np.arange(batch_size) < n
    yield batch, n
