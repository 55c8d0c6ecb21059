"""TensorBoard event files (tensorboardX, no TensorFlow) and a JSON-lines evaluation log.

Resumption: each start opens a fresh event file whose first record purges the steps after the restored
one (TensorBoard's `purge_step`), and the writer drops anything at or before the restored step, so a curve
continues without duplicate steps after a kill. Only process 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os

from absl import logging
import numpy as np

from cnn_caption import io_utils
from cnn_caption.training import parallel

is_main_process = parallel.is_main_process  # a module attribute, so tests can stand in for process 0


def _to_image_hwc(image: np.ndarray) -> np.ndarray:
  """HxW or HxWxC (C = 1, 3, 4), float in [0, 1] or uint8 -> uint8 HxWxC."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'an image must be HxW or HxWxC with C in 1, 3, 4; got shape {image.shape}')
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
  return image


class MetricWriter:
  """Scalars, images and texts for TensorBoard under one log folder; a no-op on other processes."""

  def __init__(self, logdir: str, start_step: int = 0, enabled: bool | None = None):
    """Opens a fresh event file in logdir; steps <= start_step (already written before a resume) are dropped."""
    self.logdir = logdir
    self.start_step = int(start_step)
    self.enabled = is_main_process() if enabled is None else enabled
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # heavy import, process 0

      os.makedirs(logdir, exist_ok=True)
      # purge_step: TensorBoard hides what an earlier (killed) run wrote after the restored step. The suffix
      # keeps two starts within one second apart, in start order (readers sort the files by name).
      self._writer = SummaryWriter(
        logdir,
        purge_step=self.start_step + 1,
        flush_secs=30,
        filename_suffix=f'.from{self.start_step:012d}.{os.getpid()}',
      )

  def _skip(self, step: int) -> bool:
    return self._writer is None or step <= self.start_step

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._skip(step):
      return
    for name, value in scalars.items():
      value = float(value)
      if np.isfinite(value):
        self._writer.add_scalar(name, value, step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Images as HxW or HxWxC arrays (uint8, or float in [0, 1])."""
    if self._skip(step):
      return
    for name, image in images.items():
      self._writer.add_image(name, _to_image_hwc(image), step, dataformats='HWC')

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Markdown texts under their own names as tags; written even at the start step (the config of each start)."""
    if self._writer is None:
      return
    from tensorboardX import summary as tensorboard_summary  # loaded already with the writer

    for name, text in texts.items():
      # SummaryWriter.add_text would file it under `name/text_summary`; the same summary, tagged `name`.
      summary = tensorboard_summary.text(name, text)
      summary.value[0].tag = name
      self._writer.file_writer.add_summary(summary, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class EvalLog:
  """<workdir>/eval.jsonl: one row per evaluation, tagged with its step; rows after the restored step go."""

  def __init__(self, path: str, start_step: int = 0, enabled: bool | None = None):
    self.path = path
    self.enabled = is_main_process() if enabled is None else enabled
    if not self.enabled:
      return
    rows = []
    if os.path.exists(path):
      with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip().endswith('}')]
    kept = [r for r in rows if r.get('step', 0) <= start_step]
    if len(kept) != len(rows):
      logging.info(
        '%s: dropping %d rows written after step %d (redone on resume)', path, len(rows) - len(kept), start_step
      )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    io_utils.write_jsonl(path, kept)

  def append(self, row: dict) -> None:
    if not self.enabled:
      return
    io_utils.append_jsonl(self.path, row)
