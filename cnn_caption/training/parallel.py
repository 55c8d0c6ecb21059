"""Data parallelism over a Mesh of all devices (all processes).

Sharding, padded evaluation, and the multi-process parts: jax.distributed init, process-0 helpers, agreed
verdicts, barriers, signals.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import os
import signal
import threading
from typing import TypeVar

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from cnn_caption.errors import UserError

Batch = dict[str, jax.Array]
T = TypeVar('T')


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over all devices (all hosts)."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def check_batch_size(batch_size: int, name: str = 'batch_size') -> None:
  n = jax.device_count()
  if batch_size % n:
    raise UserError(
      f'config.{name}={batch_size} is not divisible by the {n} devices; set --config.{name} to a multiple of {n}'
    )


def _sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
  return NamedSharding(mesh, P(*([None] * batch_axis), 'data'))


def local_rows(mesh: Mesh, num_rows: int) -> slice:
  """This process's rows of a global batch of num_rows, as the sharding places them on its devices."""
  index_map = _sharding(mesh, 0).addressable_devices_indices_map((num_rows,))
  spans = sorted({(s.start or 0, num_rows if s.stop is None else s.stop) for (s,) in index_map.values()})
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if stop != start:
      raise ValueError(f'rows of process {jax.process_index()} are not contiguous: {spans}')
  return slice(spans[0][0], spans[-1][1])


def shard_local_batch(batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int, batch_axis: int = 0) -> Batch:
  """This process's rows (local_rows) of a global batch of global_rows -> global arrays sharded over the mesh."""
  sharding = _sharding(mesh, batch_axis)

  def put(x):
    shape = (*x.shape[:batch_axis], global_rows, *x.shape[batch_axis + 1 :])
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(put, batch)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0) -> Batch:
  """Global host batch (the same on every process) -> arrays sharded along batch_axis; each feeds its rows."""
  n = next(iter(batch.values())).shape[batch_axis]
  rows = (slice(None),) * batch_axis + (local_rows(mesh, n),)
  return shard_local_batch({k: v[rows] for k, v in batch.items()}, mesh, n, batch_axis)


def abstract_batch(example: dict[str, np.ndarray], rows: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes, dtypes and sharding shard_batch gives a batch of `rows` rows like `example` (no data)."""
  sharding = _sharding(mesh, 0)
  return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=sharding) for k, v in example.items()}


def replicate(tree, mesh: Mesh):
  """Copies a pytree onto every device; typed PRNG keys travel as their key data (they cannot span processes)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding for outputs every process must read whole (e.g. decoded tokens)."""
  return NamedSharding(mesh, P())


def padded_batches(
  num: int, batch_size: int, fetch: Callable[[slice], dict[str, np.ndarray]]
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """Fixed-size batches over num rows (one compiled shape): the last is zero-padded.

  Yields (batch, num_real): fetch(rows) gives the real rows; `batch['mask']` marks them.
  """
  for start in range(0, num, batch_size):
    real = fetch(slice(start, min(start + batch_size, num)))
    n = len(next(iter(real.values())))
    batch = {
      k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) if n < batch_size else v
      for k, v in real.items()
    }
    batch['mask'] = np.arange(batch_size) < n
    yield batch, n


# ---- several processes (jax.distributed) ----

HEARTBEAT_TIMEOUT_S = 10  # a peer silent this long is dead: the survivors stop well within 60 s
SHUTDOWN_TIMEOUT_S = 10  # how long a finishing process waits for the others at exit
_MESSAGE_BYTES = 400  # a failure's text travels between processes in this many bytes


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto: bool = False,
  timeout_s: int = 300,
) -> None:
  """Joins the processes of one run (jax.distributed); must come before any other JAX call.

  Args:
    coordinator_address: host:port of process 0, reachable from every process.
    num_processes: processes in the run; None or 1 (and auto False) -> a single process, nothing to do.
    process_id: this process's index in [0, num_processes).
    auto: let JAX detect the cluster (SLURM, TPU pods, ...) instead of the three arguments above.
    timeout_s: how long to wait for every process to connect.
  """
  kwargs = dict(
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    initialization_timeout=timeout_s,
  )
  if auto:
    if coordinator_address or num_processes or process_id is not None:
      raise UserError(
        '--distributed_auto detects the cluster itself: drop --coordinator_address, '
        '--num_processes and --process_id (or drop --distributed_auto)'
      )
    target = 'the auto-detected cluster'
  elif not num_processes or num_processes == 1:
    if process_id:
      raise UserError(f'--process_id={process_id} needs --num_processes > {process_id}')
    return
  else:
    if num_processes < 1:
      raise UserError(f'--num_processes={num_processes} must be >= 1')
    if process_id is None or not 0 <= process_id < num_processes:
      raise UserError(
        f'--process_id={process_id} must be in [0, {num_processes}) when --num_processes='
        f'{num_processes}; give every process its own id'
      )
    if not coordinator_address or ':' not in coordinator_address:
      raise UserError(
        f'--coordinator_address={coordinator_address!r} must be host:port of process 0 '
        '(e.g. localhost:12345), the same for every process'
      )
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    target = f'coordinator {coordinator_address}'
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # jax raises these (XlaRuntimeError is a RuntimeError)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(
      f'could not join {target} within {timeout_s} s ({first}); start every process with the '
      'same --coordinator_address and --num_processes and a distinct --process_id'
    ) from None


def is_main_process() -> bool:
  """Process 0: the one that writes files and logs INFO lines."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def from_process_0(x: np.ndarray) -> np.ndarray:
  """Process 0's value of x, on every process."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _encode(message: str) -> np.ndarray:
  data = message.encode()[:_MESSAGE_BYTES]
  out = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  out[0] = 1
  out[1 : 1 + len(data)] = np.frombuffer(data, np.uint8)
  return out


def same_verdict(fn: Callable[[], T]) -> T:
  """Runs fn on every process; if it raises UserError anywhere, every process raises the same one.

  Checks of config, data and files then give one verdict everywhere, so no process goes on into a
  collective that its failed peers will never join (which would hang).
  """
  if jax.process_count() == 1:
    return fn()
  error, result = None, None
  try:
    result = fn()
  except UserError as e:
    error = str(e)
  mine = _encode(error) if error is not None else np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  failed = [i for i in range(len(everyone)) if everyone[i, 0]]
  if not failed:
    return result
  if error is not None:
    raise UserError(error)
  first = bytes(everyone[failed[0], 1:]).rstrip(b'\0').decode(errors='replace')
  raise UserError(f'process {failed[0]} stopped: {first}')


def check_shared_workdir(workdir: str) -> None:
  """Every process must see one workdir (orbax deadlocks otherwise): process 0 writes a token, the rest read it."""
  if jax.process_count() == 1:
    return
  token = int(from_process_0(np.int32(np.random.default_rng().integers(1, 2**31 - 1))))
  path = os.path.join(workdir, f'.shared_check_{token}')
  if is_main_process():
    with open(path, 'w') as f:
      f.write(str(token))
  barrier('shared_workdir_written')

  def check():
    if not os.path.exists(path):
      raise UserError(
        f'--workdir={workdir} is not shared: process {jax.process_index()} does not see the file '
        f'process 0 wrote there; use a folder every process sees (e.g. on a shared filesystem)'
      )

  try:
    same_verdict(check)
  finally:
    if is_main_process():
      os.remove(path)


def peer_failure(e: BaseException) -> str | None:
  """A one-line explanation when e is what a collective raises after a peer process died, else None."""
  text = str(e)
  if jax.process_count() > 1 and any(
    s in text
    for s in (
      'Gloo',
      'gloo',
      'heartbeat',
      'coordination service',
      'Connection reset',
      'DEADLINE_EXCEEDED',
      'UNAVAILABLE',
    )
  ):
    first = text.strip().splitlines()[0][:160]
    return (
      f'another process of this run died or disconnected ({first}); restart all {jax.process_count()} '
      'processes with the same command to resume from the last checkpoint'
    )
  return None


# ---- signals: SIGTERM (preemption) and SIGINT (Ctrl-C) stop at one step on every process ----


class StopRequest:
  """Notes SIGTERM / SIGINT; `reached(step)` is True at the same step on every process.

  One process: a Python handler sets a flag. Several: after jax.distributed.initialize JAX's preemption
  service owns SIGTERM and agrees on a sync point across processes; SIGINT is forwarded to it.
  """

  def __init__(self):
    self.signal_name: str | None = None  # the signal this process received, e.g. 'SIGTERM'
    self.stopping = False  # reached() said stop (then it stays so)
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    signums = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signal_name == 'SIGINT':
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier tells the other processes

  def reached(self, step: int) -> bool:
    """True once training must stop after `step`: call it after every call of the step, on every process."""
    if not self.stopping:
      if self._multi:
        self.stopping = bool(multihost_utils.reached_preemption_sync_point(step))
        if self.stopping and self.signal_name is None:
          self.signal_name = 'SIGTERM'  # this process was told by a peer's signal
      else:
        self.stopping = self.signal_name is not None
    return self.stopping


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step` (on every process)."""

  def __init__(self, step: int, signal_name: str | None):
    super().__init__(f'preempted at step {step}')
    self.step, self.signal_name = step, signal_name


def main_first(fn: Callable[[], T]) -> T:
  """Runs fn on process 0, then (once it succeeded) on the others: for work that creates shared files."""
  if jax.process_count() == 1:
    return fn()
  result = same_verdict(fn if is_main_process() else lambda: None)
  return same_verdict(fn) if not is_main_process() else same_verdict(lambda: result)
