"""A jax.profiler trace of a window of training steps (config.profile_steps = (start, stop))."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import logging
import jax

from cnn_caption.errors import UserError


def check_profile_steps(profile_steps: Sequence[int]) -> tuple[int, int] | None:
  """(start, stop) or None when profiling is off; a UserError for anything else."""
  steps = tuple(profile_steps or ())
  if not steps:
    return None
  if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 0 <= steps[0] < steps[1]:
    raise UserError(
      f'config.profile_steps={steps!r} must be () or (start, stop) with 0 <= start < stop, '
      'e.g. --config.profile_steps="(10, 15)"'
    )
  return steps[0], steps[1]


def check_window_in_run(profile_steps: Sequence[int], total_steps: int) -> None:
  """UserError when the window starts at or after the run's last step (no call would ever reach it)."""
  window = check_profile_steps(profile_steps)
  if window is not None and window[0] >= total_steps:
    raise UserError(
      f'config.profile_steps={window!r} starts after the run ends (steps 0..{total_steps - 1}); '
      f'choose a start below {total_steps}, or () for no trace'
    )


class StepProfiler:
  """Traces the calls covering steps [start, stop) into logdir (TensorBoard's profile plugin, Perfetto).

  Steps are counted as the train state's step before an optimizer step; with several steps per jitted call
  the window widens to whole calls: the trace starts with the call that holds step `start`.
  """

  def __init__(self, profile_steps: Sequence[int], logdir: str):
    self.window = check_profile_steps(profile_steps)
    self.logdir = logdir
    self.active = False
    self.done = self.window is None

  def before_call(self, step: int, num_steps: int = 1) -> None:
    """Starts the trace when the call of steps [step, step + num_steps) reaches into the window."""
    if self.done or self.active or step >= self.window[1] or step + num_steps <= self.window[0]:
      return
    jax.profiler.start_trace(self.logdir)
    self.active = True
    self._first = self._end = step
    logging.info('profiler: tracing from step %d into %s', step, self.logdir)

  def after_call(self, step: int, outputs: Any) -> None:
    """Stops the trace once the call ending at `step` has covered the window (waits for its outputs)."""
    if not self.active:
      return
    self._end = step
    if step >= self.window[1]:
      self.stop(outputs)

  def stop(self, outputs: Any = None) -> None:
    if not self.active:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    logging.info(
      "profiler: trace of steps %d..%d written to %s (open with TensorBoard's profile plugin or "
      'https://ui.perfetto.dev)',
      self._first,
      self._end,
      self.logdir,
    )
