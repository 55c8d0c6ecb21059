"""orbax checkpoints of the TrainState with a JSON metadata item; damaged ones are detected and set aside."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from cnn_caption.errors import UserError


class Checkpointer:
  """orbax CheckpointManager holding the TrainState and a JSON metadata item."""

  def __init__(self, directory: str, max_to_keep: int):
    _silence_closed_loop_noise()
    self.manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
    )

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    if step in self.manager.all_steps():
      # A run killed between the best-epoch save and the epoch save redoes that epoch; resumption is
      # exact, so the checkpoint already on disk holds the same values.
      logging.info('checkpoint for step %d already in %s; keeping it', step, self.directory)
      return
    self.manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )
    self.manager.wait_until_finished()

  def restore(self, step: int, target):
    """(state, meta) at step, restored into the shapes and shardings of target."""
    try:
      if self._saved_shapes(step) != _shapes(target):
        raise UserError(
          f'checkpoint {self.directory}/{step} does not match this config (other array shapes); use a '
          'fresh --workdir or the config it was trained with'
        )
      restored = self.manager.restore(step, args=_restore_args(target))
    except Exception as e:  # pylint: disable=broad-except
      if not is_damage(e):
        raise
      raise UserError(
        f'checkpoint {self.directory}/{step} is damaged ({_first_line(e)}); move that step folder aside '
        'and rerun (an older one is used), or retrain in a fresh --workdir'
      ) from None
    return restored['state'], restored['meta']

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def read_meta(self, step: int) -> dict:
    """The JSON metadata item alone (cheap: no arrays are read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _saved_shapes(self, step: int) -> list[tuple]:
    """Sorted (shape, dtype) of every saved array at step, from the checkpoint's own metadata file."""
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / 'state')
    tree = getattr(tree, 'tree', tree)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))
    return sorted((tuple(x.shape), str(x.dtype)) for x in leaves)

  def set_aside(self, steps: list[int], why: str) -> str:
    """Moves step folders out of the manager's sight into <directory>_<why>/ (kept, not deleted)."""
    out = f'{self.directory}_{why}'
    os.makedirs(out, exist_ok=True)
    for step in steps:
      dst = os.path.join(out, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.replace(os.path.join(self.directory, str(step)), dst)
    self.manager.reload()
    return out

  def restore_intact(self, target, step: int | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest intact checkpoint, or of exactly `step`; None when there is none.

    A damaged checkpoint (unreadable metadata or arrays: a truncated file, a deleted folder) gets one
    warning line and is moved to <directory>_damaged/ once an older intact one is found, so later saves
    of that step are not blocked. UserError when every checkpoint is damaged, when `step` is damaged or
    missing, or when the saved arrays have other shapes than target (another model, not damage).
    """
    steps = self.all_steps()
    if not steps:
      return None
    if step is not None and step not in steps:
      raise UserError(
        f'config.checkpoint.restore_step={step} is not in {self.directory}; saved steps: {", ".join(map(str, steps))}'
      )
    candidates = [step] if step is not None else steps[::-1]
    want = _shapes(target)
    args = _restore_args(target)
    damaged = []
    for candidate in candidates:
      try:
        shapes = self._saved_shapes(candidate)
        if shapes != want:
          raise UserError(
            f'checkpoint {self.directory}/{candidate} holds arrays of other shapes than this '
            "config's model; use the config it was trained with or a fresh --workdir"
          )
        restored = self.manager.restore(candidate, args=args)
      except Exception as e:  # pylint: disable=broad-except
        if not is_damage(e):
          raise
        reason = _first_line(e)
        logging.warning('checkpoint %s/%d is damaged (%s); trying an older one', self.directory, candidate, reason)
        damaged.append((candidate, reason))
        continue
      if damaged:
        where = self.set_aside([s for s, _ in damaged], 'damaged')
        logging.warning(
          'resuming from step %d: damaged step(s) %s moved to %s',
          candidate,
          ', '.join(str(s) for s, _ in damaged),
          where,
        )
      return candidate, restored['state'], restored['meta']
    listed = ', '.join(str(s) for s, _ in damaged)
    raise UserError(
      f'no intact checkpoint in {self.directory} (damaged: step {listed}: {damaged[0][1]}); '
      'delete the damaged step folders to resume from an older one, or use a fresh --workdir'
    )

  def restore_params(self, step: int):
    """Only the parameters, onto this process's first device, whatever devices and processes saved them.

    No target needed: used to caption from a workdir alone and by tests. UserError when the step is damaged.
    """
    try:
      return self._restore_params(step)
    except Exception as e:  # pylint: disable=broad-except
      if not is_damage(e):
        raise
      raise UserError(
        f'checkpoint {self.directory}/{step} is damaged ({_first_line(e)}); move that step folder aside '
        'to use an older one, or retrain'
      ) from None

  def _restore_params(self, step: int):
    with ocp.CheckpointManager(
      self.directory, item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    ) as reader:
      saved = reader.item_metadata(step)['state']
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), getattr(saved, 'tree', saved)
      )
      restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored['state']['params']

  def close(self) -> None:
    self.manager.close()


def best_params(workdir: str) -> tuple[str, int, Any] | None:
  """(directory, step, params) of a training workdir's best epoch, else its newest step; None if it has none.

  Only reads (nothing is saved, so nothing is pruned): captioning from a workdir, SCST's init_from.
  """
  for sub in ('checkpoints_best', 'checkpoints'):
    directory = os.path.join(workdir, sub)
    if not os.path.isdir(directory):
      continue
    reader = Checkpointer(directory, 1)
    try:
      step = reader.latest_step()
      if step is not None:
        return directory, step, reader.restore_params(step)
    finally:
      reader.close()
  return None


def _restore_args(target) -> ocp.args.Composite:
  """The state into target's shapes and shardings, and the JSON metadata."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())


def _shapes(target) -> list[tuple]:
  return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(target))


def is_damage(e: BaseException) -> bool:
  """Whether an exception raised while reading a checkpoint means the files are damaged.

  Reading a damaged step raises many kinds: tensorstore's ValueErrors (OUT_OF_RANGE, DATA_LOSS), KeyErrors
  for missing items, OSErrors, and orbax's plain Exception wrapping them. Only bad input (UserError: another
  model), memory exhaustion, and stops (KeyboardInterrupt, preemption: not Exceptions) are something else.
  """
  return isinstance(e, Exception) and not isinstance(e, (UserError, MemoryError))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:200]


def _is_closed_loop_noise(exc_type, exc_value) -> bool:
  return exc_type is RuntimeError and str(exc_value) == 'Event loop is closed'


def _is_abandoned_read(obj) -> bool:
  """An orbax read coroutine that a failed restore left unfinished, reporting its error as it is collected."""
  return inspect.iscoroutine(obj) and f'{os.sep}orbax{os.sep}' in obj.cr_code.co_filename


def _silence_closed_loop_noise() -> None:
  """Drops the late noise of a failed read (tensorstore callbacks, orbax's unfinished read coroutines).

  When a restore fails (a damaged checkpoint, another model), reads still in flight finish later and
  each prints a 'RuntimeError: Event loop is closed' traceback (hundreds of lines); the reads never
  awaited print "Exception ignored in: <coroutine ...>" with the same error as the warning already logged,
  at whatever point of the resumed run the collector runs. Only these are dropped; every other exception
  is reported as before.
  """
  if getattr(sys.excepthook, '_drops_closed_loop', False):
    return
  previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc_value, tb):
    if not _is_closed_loop_noise(exc_type, exc_value):
      previous_hook(exc_type, exc_value, tb)

  def unraisablehook(unraisable):
    noise = _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value) or _is_abandoned_read(unraisable.object)
    if not noise:
      previous_unraisable(unraisable)

  excepthook._drops_closed_loop = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class _DropLibraryInfo:
  """absl-handler filter: orbax logs several INFO lines per save; keep its warnings only."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
