"""Plots written into workdir/plots (matplotlib, Agg backend)."""

from __future__ import annotations

import functools
import os

import numpy as np

from cnn_caption import io_utils


@functools.cache
def _pyplot():
  """matplotlib.pyplot on the Agg backend, imported at the first plot.

  Imported at module level it added about 2 s to every launch.py start, a bad flag's one-line error included.
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  io_utils.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110, bbox_inches='tight'))
  _pyplot().close(fig)


def plot_curves(series: dict[str, list[float]], ylabel: str, path: str, title: str = '') -> None:
  """One line per named series against epochs 1..N."""
  fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
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


def filter_mosaic(kernel_HxWxIxO: np.ndarray) -> tuple[np.ndarray, int]:
  """The kernels as one 2-D mosaic (NaN between tiles): a row per output channel, a column per input channel.

  Returns the mosaic and the number of input channels shown per row (1: output channels wrap in rows of 8).
  """
  kernel = np.asarray(kernel_HxWxIxO, np.float32)
  kh, kw, cin, cout = kernel.shape
  if cin == 1:  # single input channel: wrap the output channels into rows of 8
    cols = min(cout, 8)
    rows = -(-cout // cols)
    tiles = np.zeros((rows * cols, kh, kw), np.float32)
    tiles[:cout] = kernel[:, :, 0, :].transpose(2, 0, 1)
    grid = tiles.reshape(rows, cols, kh, kw)
  else:
    rows, cols = cout, cin
    grid = kernel.transpose(3, 2, 0, 1)  # (O, I, kh, kw)
  pad = np.full((rows, cols, kh + 1, kw + 1), np.nan, np.float32)
  pad[:, :, :kh, :kw] = grid
  return pad.transpose(0, 2, 1, 3).reshape(rows * (kh + 1), cols * (kw + 1)), cin


def filter_image(kernel_HxWxIxO: np.ndarray, scale: int = 4) -> np.ndarray:
  """The kernel mosaic as an RGB uint8 image (blue negative, white 0, red positive; grey between tiles)."""
  mosaic, _ = filter_mosaic(kernel_HxWxIxO)
  vmax = float(np.nanmax(np.abs(mosaic))) or 1.0
  rgb = (_pyplot().get_cmap('bwr')((np.nan_to_num(mosaic) / vmax + 1) / 2)[..., :3] * 255).astype(np.uint8)
  rgb[np.isnan(mosaic)] = 128
  return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def plot_filters(kernel_HxWxIxO: np.ndarray, path: str, title: str = '') -> None:
  """The learned kernels as one mosaic: a row per output channel, a column per input channel."""
  mosaic, cin = filter_mosaic(kernel_HxWxIxO)
  rows, cols = mosaic.shape[0] // (kernel_HxWxIxO.shape[0] + 1), mosaic.shape[1] // (kernel_HxWxIxO.shape[1] + 1)
  vmax = float(np.nanmax(np.abs(mosaic))) or 1.0
  fig, ax = _pyplot().subplots(figsize=(min(2 + cols * 0.35, 14), min(1.5 + rows * 0.35, 14)))
  ax.imshow(mosaic, cmap='bwr', vmin=-vmax, vmax=vmax, interpolation='nearest')
  ax.set_xlabel('input channel' if cin > 1 else '')
  ax.set_ylabel('output channel' if cin > 1 else '')
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)
  _save(fig, path)


def figure_to_array(fig) -> np.ndarray:
  """An RGB uint8 array of a matplotlib figure (closes it)."""
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  _pyplot().close(fig)
  return rgb


def load_rgb(image_path: str, size: int = 224) -> np.ndarray:
  from PIL import Image

  with Image.open(image_path) as im:
    return np.asarray(im.convert('RGB').resize((size, size)))


def attention_figure(rgb: np.ndarray, words: list[str], alphas_LxN: np.ndarray, max_panels: int | None = None):
  """The image, then one panel per generated word (at most max_panels) with its attention overlaid."""
  import textwrap

  size = rgb.shape[0]
  side = int(round(np.sqrt(alphas_LxN.shape[1])))
  words = list(words) + ['<eos>']
  panels = min(len(words), alphas_LxN.shape[0], max_panels or len(words))
  cols = min(panels + 1, 6)
  rows = -(-(panels + 1) // cols)
  fig, axes = _pyplot().subplots(rows, cols, figsize=(cols * 2.0, rows * 2.2), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  axes[0, 0].imshow(rgb)
  axes[0, 0].set_title(textwrap.fill(' '.join(words[:-1]), 30), fontsize=7)
  for t in range(panels):
    ax = axes[(t + 1) // cols, (t + 1) % cols]
    grid = alphas_LxN[t].reshape(side, side)
    ax.imshow(rgb)
    ax.imshow(grid, cmap='inferno', alpha=0.6, extent=(0, size, size, 0), interpolation='bilinear')
    ax.set_title(words[t], fontsize=9)
  return fig


def plot_attention(image_path: str, words: list[str], alphas_LxN: np.ndarray, path: str) -> None:
  """The image, then one panel per generated word with its attention over the region grid overlaid."""
  _save(attention_figure(load_rgb(image_path), words, alphas_LxN), path)


def attention_image(image_path: str, words: list[str], alphas_LxN: np.ndarray, max_words: int = 11) -> np.ndarray:
  """plot_attention's figure (panels for the first max_words words) as an RGB uint8 array (for TensorBoard)."""
  fig = attention_figure(load_rgb(image_path, 112), words, alphas_LxN, max_panels=max_words)
  fig.set_dpi(60)
  return figure_to_array(fig)
