"""orbax checkpoints of the TrainState with a JSON metadata item."""

from __future__ import annotations

import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from cnn_caption.errors import UserError


class Checkpointer:
  """orbax CheckpointManager holding the TrainState and a JSON metadata item."""

  def __init__(self, directory: str, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

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
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, target):
    """(state, meta) at step, restored into the shapes and shardings of target."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'checkpoint {self.directory}/{step} does not match this config '
                      f'({str(e).splitlines()[0][:200]}); use a fresh --workdir or the config it was '
                      'trained with') from None
    return restored['state'], restored['meta']

  def restore_params(self, step: int):
    """Only the parameters, onto this process's first device, whatever devices and processes saved them.

    No target needed: used to caption from a workdir alone and by tests.
    """
    with ocp.CheckpointManager(self.directory, item_handlers={'state': ocp.StandardCheckpointHandler(),
                                                              'meta': ocp.JsonCheckpointHandler()}) as reader:
      saved = reader.item_metadata(step)['state']
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              getattr(saved, 'tree', saved))
      restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored['state']['params']

  def close(self) -> None:
    self.manager.close()


class _DropLibraryInfo:
  """absl-handler filter: orbax logs several INFO lines per save; keep its warnings only."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
