"""The task contract: everything the generic Trainer may call. A task is the only model-specific part."""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np

Params = Any  # a pytree of arrays
Batch = dict[str, jax.Array]


class Task(Protocol):
  """What cnn_caption.train.Trainer needs from a problem (classification, captioning, ...)."""

  model: nn.Module  # the Flax module being trained
  num_train: int  # training examples (one epoch = num_train // batch_size steps)
  selection_metric: str  # validation metric (higher is better) that picks the best epoch

  def example_inputs(self) -> tuple:
    """Positional model inputs of batch 1, for parameter initialisation."""

  def train_batch(self, indices: np.ndarray, step: int) -> dict[str, np.ndarray]:
    """Host arrays of the training examples `indices` (leading axis = len(indices)).

    `indices` holds len(indices) // batch_size consecutive steps' examples, the first being global step
    `step`: random augmentation seeded by (seed, step) repeats exactly on resume.

    A task with the class attribute `on_policy = True` (self-critical training, tasks/scst.py) is called
    as train_batch(indices, step, params=the current parameters), one step per call: its batches are
    sampled from the model being trained.
    """

  def loss(self, params: Params, batch: Batch, *, apply_fn, rngs: dict, train: bool) -> tuple[jax.Array, dict]:
    """(scalar loss, aux) for one batch; traced inside the jitted train step."""

  def metrics(self, loss: jax.Array, aux: dict, grads: Params) -> dict[str, jax.Array]:
    """Per-step scalars, all logged; traced inside the jitted train step.

    Must include 'loss'; an optional 'loss_weight' (e.g. the number of target tokens) weights the loss in
    the epoch and log-interval means.
    """

  def check_memory(self, params: Params) -> None:
    """Compiles the evaluation calls for their batch sizes; UserError if one cannot fit (cnn_caption.memory).

    Called once before training, so a too-large config.eval_batch_size stops the run before its first step.
    """

  def evaluate(self, params: Params, split: str) -> dict[str, float]:
    """Metrics of `params` on 'val' or 'test' (must include selection_metric)."""

  def save_assets(self, workdir: str) -> None:
    """Files a later run or `--mode=caption` needs besides checkpoints (vocabulary, ...)."""

  def final_results(self, params: Params, best_params: Params, workdir: str) -> dict[str, Any]:
    """Test figures (and task-specific outputs) for results.json."""

  def tensorboard_images(self, params: Params) -> dict[str, np.ndarray]:
    """Images (HxWxC uint8) for TensorBoard at each epoch end, by tag; {} for none."""

  def make_plots(self, history: list[dict], params: Params, workdir: str) -> None:
    """Plots under workdir/plots from the per-epoch history and the final parameters."""

  # Optional: `initial_params(self, params) -> params`, called once on a fresh start (no checkpoint, no
  # config.init_from) with the freshly initialised parameters; returns them with pretrained parts put in
  # (the captioner's trainable encoder head). The Trainer calls it only where a task defines it.
