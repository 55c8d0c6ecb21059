"""The classifier's sections: confusion matrix, per-class accuracy, confident mistakes, learned filters."""

from __future__ import annotations

import os

import numpy as np

from cnn_caption.data import fashion_mnist
from cnn_caption.report import page
from cnn_caption.report.files import Run
from cnn_caption.report.page import esc

PREDICTIONS_FILE = 'test_predictions.npz'  # written by the classification task with its final results


def _load(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (labels, preds), 1)
  return counts


def _confusion_table(counts: np.ndarray, names: list[str]) -> str:
  totals = counts.sum(1)
  head = ''.join(f'<th class="num" title="{esc(n)}">{esc(n)}</th>' for n in names)
  rows = []
  for i, name in enumerate(names):
    cells = []
    for j in range(len(names)):
      share = counts[i, j] / max(totals[i], 1)
      color = '31,119,180' if i == j else '214,39,40'
      alpha = min(1.0, share * (1.0 if i == j else 4.0)) * 0.8  # mistakes are rarer: scaled up to be seen
      style = f' style="background:rgba({color},{alpha:.2f})"' if counts[i, j] else ''
      cells.append(f'<td class="num"{style}>{counts[i, j]}</td>')
    accuracy = counts[i, i] / totals[i] if totals[i] else None
    rows.append(
      f'<tr><th>{esc(name)}</th>{"".join(cells)}<td class="num">{totals[i]}</td>'
      f'<td class="num">{esc(page.fmt(accuracy))}</td></tr>'
    )
  return (
    '<table id="confusion"><thead><tr><th>true \\ predicted</th>'
    f'{head}<th class="num">images</th><th class="num">accuracy</th></tr></thead>'
    f'<tbody>{"".join(rows)}</tbody></table>'
  )


def _gallery(data: dict[str, np.ndarray], names: list[str]) -> str:
  figures = []
  for index, image in zip(data['mistake_index'], data['mistake_image']):
    true, pred, prob = names[data['label'][index]], names[data['pred'][index]], float(data['prob'][index])
    figures.append(
      f'<figure class="mistake"><img alt="test image {index}" src="{page.png_data_url(image)}">'
      f'<figcaption>#{index}<br>true <b>{esc(true)}</b><br>predicted <b>{esc(pred)}</b> '
      f'<span class="prob">{prob:.3f}</span></figcaption></figure>'
    )
  if not figures:
    return '<p>No test mistakes.</p>'
  return f'<div class="gallery" id="mistakes">{"".join(figures)}</div>'


def section(run: Run) -> str:
  path = run.path(PREDICTIONS_FILE)
  parts = ['<h2 id="test">Test predictions</h2>']
  if not os.path.exists(path):
    parts.append(
      f'<p class="note">No {PREDICTIONS_FILE} in this workdir (the run is unfinished, or older than that file): '
      'no confusion matrix or mistakes; train again to get them.</p>'
    )
  else:
    data = _load(path)
    names = [str(n) for n in data.get('class_names', fashion_mnist.CLASS_NAMES)]
    counts = confusion_matrix(data['label'], data['pred'], len(names))
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    parts.append(
      f'<p>{counts.sum():,} test images, accuracy {accuracy:.4f} (the parameters whose test accuracy results.json '
      'reports). Rows: true class; columns: predicted class.</p>'
    )
    parts.append(_confusion_table(counts, names))
    off = counts.copy()
    np.fill_diagonal(off, 0)
    pairs = [np.unravel_index(k, off.shape) for k in np.argsort(-off, axis=None, kind='stable')[:5]]
    pairs = [(names[i], names[j], int(off[i, j])) for i, j in pairs if off[i, j]]
    if pairs:
      parts.append('<h3>Most frequent confusions</h3>')
      parts.append(page.table(['true', 'predicted as', 'images'], [list(p) for p in pairs], numeric={2}))
    parts.append(f'<h3>The {len(data["mistake_index"])} most confident mistakes</h3>')
    parts.append(_gallery(data, names))
  png = run.path(os.path.join('plots', 'filters_conv1.png'))
  parts.append('<h2 id="filters">Learned first-layer filters</h2>')
  if os.path.exists(png):
    parts.append(
      f'<figure><img class="filters" alt="conv1 kernels" src="{page.file_data_url(png)}" style="max-width:600px">'
      "<figcaption>the first layer's kernels after the last epoch (blue negative, white 0, red positive)"
      '</figcaption></figure>'
    )
  else:
    parts.append('<p class="note">No plots/filters_conv1.png (written when a run with a conv1 layer finishes).</p>')
  return '\n'.join(parts)
