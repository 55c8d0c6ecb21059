"""A sweep's page: its members side by side (a table and overlaid curves), each linking to its own report."""

from __future__ import annotations

import os

from cnn_caption.report import charts
from cnn_caption.report import files
from cnn_caption.report import page
from cnn_caption.report.page import esc

_COLUMNS = (
  ('learning_rate', 'learning rate'),
  ('val_accuracy', 'final val accuracy'),
  ('best_val_accuracy', 'best val accuracy'),
  ('test_accuracy', 'test accuracy'),
  ('train_loss', 'final train loss'),
  ('train_seconds', 'training seconds'),
)


def _member_dir(workdir: str, run: dict) -> str:
  """A member's folder: where results.json says, else beside the parent (the sweep may have been moved)."""
  recorded = run.get('workdir') or ''
  if os.path.isdir(recorded):
    return recorded
  return os.path.join(workdir, os.path.basename(recorded.rstrip('/')))


def sweep_page(workdir: str) -> str:
  results = files.read_json(os.path.join(workdir, files.RESULTS_FILE))
  runs, best = results['runs'], results.get('best') or {}
  rows, histories = [], {}
  for run in runs:
    member = _member_dir(workdir, run)
    label = f'lr {run.get("learning_rate"):g}' if isinstance(run.get('learning_rate'), (int, float)) else member
    report = os.path.join(member, files.REPORT_FILE)
    link = os.path.relpath(report, workdir)
    name = page.Raw(f'<a href="{esc(link)}">{esc(label)}</a>') if os.path.exists(report) else page.Raw(esc(label))
    chosen = 'yes' if run.get('workdir') == best.get('workdir') else ''
    rows.append([name, *(run.get(key) for key, _ in _COLUMNS), chosen])
    histories[label] = files.read_jsonl(os.path.join(member, files.METRICS_FILE)) or []
  table = page.table(
    ['member', *(label for _, label in _COLUMNS), 'chosen'],
    rows,
    numeric=set(range(1, len(_COLUMNS) + 1)),
    attrs=' id="members"',
  )
  metrics = sorted({k for h in histories.values() for r in h for k in r if k.startswith(('val_', 'train_loss'))})
  figures = []
  for key in metrics:
    series = {label: [(r['epoch'], r.get(key)) for r in h] for label, h in histories.items()}
    svg = charts.line_chart(series, key.replace('_', ' '))
    if svg:
      figures.append(f'<figure>{svg}</figure>')
  body = '\n'.join(
    [
      f'<h1>sweep: {esc(os.path.basename(os.path.abspath(workdir)))}</h1>',
      f'<p class="sub">{esc(os.path.abspath(workdir))} · {len(runs)} members · chosen by '
      f'{esc(results.get("selection", "validation"))}</p>',
      '<h2 id="members-h">Members</h2>',
      table,
      '<h2 id="curves">Curves, overlaid</h2>',
      f'<div class="figs">{"".join(figures)}</div>' if figures else '<p class="note">No member history found.</p>',
      page.details("config (the sweep's, resolved)", page.json_block(results.get('config') or {})),
    ]
  )
  return page.document(f'sweep {os.path.basename(os.path.abspath(workdir))}', body)
