"""Does one call fit in memory? Ahead-of-time compilation gives its bytes before any batch is built.

Evaluation and feature extraction run with a user-chosen batch size (config.eval_batch_size,
config.encoder.batch_size). Too large a value used to surface as an allocation failure deep inside XLA,
or as the host being killed. `compile_within_memory` compiles the call for its abstract shapes, reads
XLA's memory analysis (arguments + outputs + temporaries) and compares it with the memory free on the
device (its allocator's limit on GPU/TPU, MemAvailable and the cgroup limit on CPU), so a batch size
that cannot fit stops with one line before anything is allocated. The compiled call is returned and
used, so nothing is compiled twice.
"""

from __future__ import annotations

from typing import Any

import jax

from cnn_caption.errors import UserError

HEADROOM = 0.9  # a call may use at most this fraction of the free memory
GIB = 2**30


def _read_int(path: str) -> int | None:
  try:
    with open(path, encoding='ascii') as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


def _host_available_bytes() -> int | None:
  """MemAvailable, lowered to the cgroup (v2 or v1) limit minus its usage where one is set."""
  available = None
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  for limit_path, usage_path in (
    ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
    ('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory/memory.usage_in_bytes'),
  ):
    limit, usage = _read_int(limit_path), _read_int(usage_path)
    if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
      free = max(limit - usage, 0)
      available = free if available is None else min(available, free)
  return available


def available_bytes(device: jax.Device) -> int | None:
  """Bytes free for one call on `device` (None when the platform does not say)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 (platforms without allocator statistics raise various errors)
    stats = None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
  if device.platform == 'cpu':
    return _host_available_bytes()
  return None


def call_bytes(compiled: jax.stages.Compiled) -> int | None:
  """Bytes one device holds during a call: arguments, outputs and XLA temporaries (donated buffers once)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    return None
  if analysis is None:
    return None
  return (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def compile_within_memory(
  jitted: Any, args: tuple, *, knob: str, value: int, what: str, host_bytes: int = 0, static: tuple = ()
) -> jax.stages.Compiled:
  """jitted compiled for `args` (arrays or jax.ShapeDtypeStruct), or UserError if one call cannot fit.

  knob, value: the config field that sets the size ('eval_batch_size') and its value; what: the call, for the message;
  host_bytes: host memory the caller holds beside the call (its numpy batch). On CPU every local device
  shares the host's memory, so the per-device figure counts once per local device. `static` are the
  leading static arguments of `jitted`, given to lower() but not to the compiled call.
  """
  compiled = jitted.lower(*static, *args).compile()
  need = call_bytes(compiled)
  device = jax.local_devices()[0]
  free = available_bytes(device)
  if need is None or free is None:
    return compiled
  if device.platform == 'cpu':
    need = need * jax.local_device_count() + host_bytes
  if need > HEADROOM * free:
    raise UserError(
      f'{what} with config.{knob}={value} needs about {need / GIB:.2f} GiB per call, but only {free / GIB:.2f} GiB '
      f'of {device.platform} memory is free; lower --config.{knob}'
    )
  return compiled


def _signature(args: tuple) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, 'sharding', None)) for x in leaves)


class CheckedJit:
  """jax.jit(fn) whose compilations are checked against free memory first (compile_within_memory).

  `check(*abstract_args)` compiles and checks before the caller builds a batch of that size; calls with
  arguments of the same shapes, dtypes and shardings then reuse that compilation.
  """

  def __init__(self, fn, *, knob: str, value: int, what: str, static: tuple = (), **jit_kwargs):
    self._jitted = (
      jax.jit(fn, static_argnums=tuple(range(len(static))), **jit_kwargs) if static else jax.jit(fn, **jit_kwargs)
    )
    self.knob, self.value, self.what, self.static = knob, value, what, static
    self._compiled: dict[tuple, jax.stages.Compiled] = {}

  def check(self, *args, host_bytes: int = 0) -> None:
    key = _signature(args)
    if key not in self._compiled:
      self._compiled[key] = compile_within_memory(
        self._jitted,
        args,
        knob=self.knob,
        value=self.value,
        what=self.what,
        host_bytes=host_bytes,
        static=self.static,
      )

  def __call__(self, *args):
    self.check(*args)
    return self._compiled[_signature(args)](*args)
