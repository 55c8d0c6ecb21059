"""What a training run reports besides metrics.jsonl: progress lines, TensorBoard, eval.jsonl, the profiler.

The trainer calls it at four points: after each jitted call's metrics reach the host (`train_metrics`),
around each call (`before_call` / `after_call`, for the profiler), after each evaluation (`evaluation`),
and at the end (`close`). Per-step metrics arrive with a leading step axis; a task may return
`loss_weight` (e.g. the number of target tokens) to weight the loss means.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
import contextlib
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from cnn_caption.training import metric_writers
from cnn_caption.training import profiling
from cnn_caption.training import run_record

TENSORBOARD_DIR = 'tensorboard'
PROFILE_DIR = 'profile'
EVAL_LOG = 'eval.jsonl'


def format_duration(seconds: float) -> str:
  """12s, 4m05s, 2h07m: a progress line's estimate, to the precision that matters."""
  seconds = max(int(round(seconds)), 0)
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def weighted_loss_sums(metrics: Mapping[str, Any]) -> tuple[float, float]:
  """(sum of loss * weight, sum of weight) over a call's steps; weight = metrics['loss_weight'] or 1."""
  losses = np.asarray(metrics['loss'], np.float64)
  weights = np.asarray(metrics['loss_weight'], np.float64) if 'loss_weight' in metrics else np.ones_like(losses)
  return float((losses * weights).sum()), float(weights.sum())


class RunMonitor:
  """Interval means of the per-step metrics, TensorBoard scalars/images/text, eval log and profiler."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    learning_rate_fn: Callable[[int], float] | None = None,
  ):
    self.config = config
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.log_every = max(int(config.log_every_steps), 1)
    self.learning_rate_fn = learning_rate_fn
    self.writer = metric_writers.MetricWriter(os.path.join(workdir, TENSORBOARD_DIR), start_step)
    self.eval_log = metric_writers.EvalLog(os.path.join(workdir, EVAL_LOG), start_step)
    profile_dir = os.path.join(workdir, PROFILE_DIR)
    if jax.process_count() > 1:  # processes on one host would write the same <host>.xplane.pb
      profile_dir = os.path.join(profile_dir, f'process_{jax.process_index()}')
    self.profiler = profiling.StepProfiler(config.get('profile_steps', ()), profile_dir)
    config_md = '\n'.join('    ' + line for line in run_record.config_text(config).splitlines())
    self.writer.write_texts(start_step, {'config': config_md})
    self._start_t, self._start_step = time.time(), start_step  # for the run's ETA: this start's whole wall time
    self._reset_interval(start_step)

  def _reset_interval(self, step: int) -> None:
    self._sums: dict[str, float] = {}
    self._num_steps = 0
    self._loss_sum = self._weight_sum = 0.0
    self._t, self._t_step = time.time(), step
    self._paused_seconds = 0.0

  @contextlib.contextmanager
  def paused(self, outputs: Any = None) -> Iterator[None]:
    """Time spent inside is not training: left out of steps/s and examples/s (not out of the ETA).

    Waits for `outputs` (e.g. the train state) first, so that steps still running on the device count as training.
    """
    jax.block_until_ready(outputs)
    t = time.time()
    try:
      yield
    finally:
      self._paused_seconds += time.time() - t

  def before_call(self, step: int, num_steps: int) -> None:
    self.profiler.before_call(step, num_steps)

  def after_call(self, step: int, outputs: Any) -> None:
    self.profiler.after_call(step, outputs)

  def train_metrics(self, first_step: int, metrics: Mapping[str, Any]) -> None:
    """One call's per-step metrics (host arrays, leading step axis) for steps first_step+1 .. first_step+n."""
    n = int(np.asarray(metrics['loss']).shape[0])
    loss_sum, weight_sum = weighted_loss_sums(metrics)
    self._loss_sum += loss_sum
    self._weight_sum += weight_sum
    for name, values in metrics.items():
      if name not in ('loss', 'loss_weight'):
        self._sums[name] = self._sums.get(name, 0.0) + float(np.asarray(values, np.float64).sum())
    self._num_steps += n
    last = first_step + n
    if last // self.log_every > first_step // self.log_every:
      self._emit(last)

  def _emit(self, step: int) -> None:
    now = time.time()
    seconds = max(now - self._t - self._paused_seconds, 1e-9)
    rate = (step - self._t_step) / seconds
    # The rest of the run at this start's average pace so far, evaluations and checkpoints included.
    eta = (self.total_steps - step) * (now - self._start_t) / max(step - self._start_step, 1)
    scalars = {'train/loss': self._loss_sum / max(self._weight_sum, 1e-12)}
    scalars.update({f'train/{name}': total / self._num_steps for name, total in self._sums.items()})
    if self.learning_rate_fn is not None:
      scalars['train/learning_rate'] = float(self.learning_rate_fn(step))
    scalars['train/steps_per_second'] = rate
    scalars['train/examples_per_second'] = rate * self.config.batch_size
    self.writer.write_scalars(step, scalars)
    extra = '  '.join(
      f'{k[6:]} {v:.4g}'
      for k, v in scalars.items()
      if k not in ('train/loss', 'train/steps_per_second', 'train/examples_per_second')
    )
    logging.info(
      'epoch %d step %d/%d  loss %.4f  %s  %.1f steps/s  %.0f examples/s  ETA %s',
      (step - 1) // self.steps_per_epoch + 1,
      step,
      self.total_steps,
      scalars['train/loss'],
      extra,
      rate,
      rate * self.config.batch_size,
      format_duration(eta),
    )
    self._reset_interval(step)

  def evaluation(self, step: int, epoch: float, results: Mapping[str, Mapping[str, float]]) -> None:
    """One evaluation, e.g. {'val': {...}, 'val_ema': {...}}: TensorBoard `val/name` and one eval.jsonl row."""
    row = {'step': step, 'epoch': epoch}
    for prefix, metrics in results.items():
      self.writer.write_scalars(step, {f'{prefix}/{name}': value for name, value in metrics.items()})
      row.update({f'{prefix}_{name}': value for name, value in metrics.items()})
    self.eval_log.append(row)
    self.writer.flush()

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    if images:
      self.writer.write_images(step, images)
      self.writer.flush()

  def close(self) -> None:
    self.profiler.stop()
    self.writer.close()
