"""Plots written into workdir/plots (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _save(fig, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  plt.close(fig)
  os.replace(tmp, path)


def plot_curves(series: dict[str, list[float]], ylabel: str, path: str, title: str = '') -> None:
  """One line per named series against epochs 1..N."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, values in series.items():
    ax.plot(np.arange(1, len(values) + 1), values, marker='o', markersize=3, label=name)
  ax.set_xlabel('epoch')
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if len(series) > 1:
    ax.legend()
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_filters(kernel_HxWxIxO: np.ndarray, path: str, title: str = '') -> None:
  """A grid of the learned kernels: one row per output channel, one column per input channel."""
  kernel = np.asarray(kernel_HxWxIxO, np.float32)
  _, _, cin, cout = kernel.shape
  cols = cin if cin > 1 else min(cout, 8)
  rows = cout if cin > 1 else int(np.ceil(cout / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6 + 0.5, rows * 0.6 + 0.5), squeeze=False)
  vmax = float(np.abs(kernel).max()) or 1.0
  for r in range(rows):
    for c in range(cols):
      ax = axes[r, c]
      ax.axis('off')
      o, i = (r, c) if cin > 1 else (r * cols + c, 0)
      if o < cout:
        ax.imshow(kernel[:, :, i, o], cmap='bwr', vmin=-vmax, vmax=vmax)
  if title:
    fig.suptitle(title)
  _save(fig, path)
