"""The task contract: everything the generic Trainer may call. A task is the only model-specific part.

A task subclasses `Task`, sets `model`, `num_train` and `selection_metric` in its constructor
`__init__(config, workdir, mesh)`, and implements the members marked "required" below; the others have
defaults that a task overrides only where it differs. Register it in `cnn_caption/tasks/__init__.py` (or
with `tasks.register`) and name it in a config as `config.task`.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from cnn_caption.errors import UserError

Params = Any  # a pytree of arrays
Batch = dict[str, jax.Array]


class Task:
  """What cnn_caption.train.Trainer needs from a problem (classification, captioning, ...)."""

  model: nn.Module  # required: the Flax module being trained
  num_train: int  # required: training examples (one epoch = num_train // batch_size steps)
  selection_metric: str = 'accuracy'  # validation metric (higher is better) that picks the best epoch
  # True when train_batch needs the current parameters (self-critical training samples from the model being
  # trained); such a task requires config.steps_per_call=1, so every batch sees the newest parameters.
  on_policy: ClassVar[bool] = False

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first impossible field of this task's own config groups.

    Called by config_utils.validate before anything is built, after the fields every task shares.
    """

  def example_inputs(self) -> tuple:
    """Required: positional model inputs of batch 1, for parameter initialisation."""
    raise NotImplementedError

  def train_batch(self, indices: np.ndarray, step: int, params: Params) -> dict[str, np.ndarray]:
    """Required: host arrays of the training examples `indices` (leading axis = len(indices)).

    `indices` holds len(indices) // batch_size consecutive steps' examples, the first being global step
    `step`: random augmentation seeded by (seed, step) repeats exactly on resume. `params` are the current
    parameters; only an on-policy task reads them.
    """
    raise NotImplementedError

  def loss(self, params: Params, batch: Batch, *, apply_fn, rngs: dict, train: bool) -> tuple[jax.Array, dict]:
    """Required: (scalar loss, aux) for one batch; traced inside the jitted train step."""
    raise NotImplementedError

  def metrics(self, loss: jax.Array, aux: dict, grads: Params) -> dict[str, jax.Array]:
    """Per-step scalars, all logged; traced inside the jitted train step.

    Must include 'loss'; an optional 'loss_weight' (e.g. the number of target tokens) weights the loss in
    the epoch and log-interval means.
    """
    del aux, grads
    return {'loss': loss}

  def evaluate(self, params: Params, split: str) -> dict[str, float]:
    """Required: metrics of `params` on 'val' or 'test' (must include selection_metric)."""
    raise NotImplementedError

  def initial_params(self, params: Params) -> Params:
    """Freshly initialised parameters with pretrained parts put in; called once on a fresh start."""
    return params

  def check_memory(self, params: Params) -> None:
    """Compiles the evaluation calls for their batch sizes; UserError if one cannot fit (training.memory).

    Called once before training, so a too-large config.eval_batch_size stops the run before its first step.
    """
    del params

  def save_assets(self, workdir: str) -> None:
    """Files a later run or `--mode=caption` needs besides checkpoints (vocabulary, ...)."""
    del workdir

  def final_results(self, params: Params, best_params: Params, workdir: str) -> dict[str, Any]:
    """Test figures (and task-specific outputs) for results.json; by default test metrics of the best epoch."""
    del params, workdir
    return {f'test_{k}': v for k, v in self.evaluate(best_params, 'test').items()}

  def tensorboard_images(self, params: Params) -> dict[str, np.ndarray]:
    """Images (HxWxC uint8) for TensorBoard at each epoch end, by tag; {} for none."""
    del params
    return {}

  def make_plots(self, history: list[dict], params: Params, workdir: str) -> None:
    """Plots under workdir/plots from the per-epoch history and the final parameters."""
    del history, params, workdir


# Checks a task's validate_config uses: check(config, 'group.field', predicate, 'what it must be').


def get_field(config, path: str):
  """config's value at a dotted path, or None where a group or field is absent."""
  node = config
  for part in path.split('.'):
    if part not in node:
      return None
    node = node[part]
  return node


def check(config, path: str, ok: Callable[[Any], bool], requirement: str) -> None:
  """UserError naming config.<path> unless ok(value); an absent or None field passes."""
  value = get_field(config, path)
  if value is None:
    return
  try:
    good = ok(value)
  except TypeError:
    good = False
  if not good:
    raise UserError(f'config.{path}={value!r} is invalid: it must be {requirement} (set --config.{path}=...)')


def pos_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def nonneg_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def nonneg(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def finite_pos(v) -> bool:
  return finite(v) and v > 0


def prob(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def pos_ints(v) -> bool:
  return isinstance(v, (tuple, list)) and len(v) > 0 and all(pos_int(x) for x in v)


def int_in(lo: int, hi: int) -> Callable[[Any], bool]:
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi
