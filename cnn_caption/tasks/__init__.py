"""Task registry: config.task -> the class that implements the Task contract (see base.py).

A task of your own needs no entry here: name it in the config as 'package.module:Class'.
"""

from __future__ import annotations

import importlib

from jax.sharding import Mesh
import ml_collections

from cnn_caption.errors import UserError
from cnn_caption.tasks.base import Task

# name -> 'module:Class'; imported on demand so a classifier run never imports the captioning stack.
_REGISTRY = {
  'classification': 'cnn_caption.tasks.classification:ClassificationTask',
  'captioning': 'cnn_caption.tasks.captioning:CaptioningTask',
  'scst': 'cnn_caption.tasks.scst:ScstTask',
}


def task_class(name: str) -> type[Task]:
  """The class of config.task: a registry name, or 'package.module:Class' for a task of your own."""
  if not isinstance(name, str) or (name not in _REGISTRY and ':' not in name):
    raise UserError(
      f"config.task={name!r} is unknown; use one of {sorted(_REGISTRY)} or name your own as 'package.module:Class'"
    )
  path = _REGISTRY.get(name, name)
  module_path, _, attr = path.partition(':')
  try:
    module = importlib.import_module(module_path)
  except ImportError as e:
    raise UserError(f'config.task={name!r}: cannot import {module_path} ({e}); check the module path') from None
  cls = getattr(module, attr, None)
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise UserError(f'config.task={name!r}: {module_path}.{attr} is not a subclass of cnn_caption.tasks.base.Task')
  return cls


def get_task(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  """The task of config.task, with its data loaded, evaluating over `mesh`."""
  return task_class(config.task)(config, workdir, mesh)


__all__ = ['Task', 'get_task', 'task_class']
