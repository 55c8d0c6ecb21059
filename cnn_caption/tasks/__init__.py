"""Task registry: config.task -> the class that implements the Task contract (see base.py)."""

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


def task_class(name: str) -> type:
  if name not in _REGISTRY:
    raise UserError(f'config.task={name!r} is unknown; use one of {sorted(_REGISTRY)}')
  module, cls = _REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), cls)


def get_task(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  """The task of config.task, with its data loaded, evaluating over `mesh`."""
  return task_class(config.task)(config, workdir, mesh)


__all__ = ['Task', 'get_task', 'task_class']
