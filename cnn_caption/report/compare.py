"""Two captioning runs side by side on the same test images: per-image differences, sortable and filterable.

Either side may be a baseline's folder (--mode=baselines writes WORKDIR/baselines/NAME): it holds the same
test_captions.json, config.json and results.json as a run.
"""

from __future__ import annotations

import os

from cnn_caption import io_utils
from cnn_caption.captioning import metrics as metrics_lib
from cnn_caption.errors import UserError
from cnn_caption.report import captioner
from cnn_caption.report import files
from cnn_caption.report import page
from cnn_caption.report.page import esc


def _captioning_run(workdir: str) -> files.Run:
  run = files.load_run(workdir)
  if not os.path.exists(run.path(captioner.CAPTIONS_FILE)):
    raise UserError(
      f'{workdir} has no {captioner.CAPTIONS_FILE}: --mode=compare needs two finished captioning runs '
      '(or a baseline folder of --mode=baselines)'
    )
  return run


def _delta(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def comparison_page(
  workdir_a: str, workdir_b: str, *, resamples: int = 10000, page_size: int = captioner.PAGE_SIZE
) -> str:
  """The page comparing run A with run B image by image (A's thumbnails and attention)."""
  run_a, run_b = _captioning_run(workdir_a), _captioning_run(workdir_b)
  rows_a, side, note = captioner.table_rows(run_a)
  rows_b, _, _ = captioner.table_rows(run_b, thumbnails=False)
  by_name_b = {r['name']: r for r in rows_b}
  names_a = {r['name'] for r in rows_a}
  if names_a != set(by_name_b):
    raise UserError(
      f'{workdir_a} and {workdir_b} captioned different test images ({len(names_a ^ set(by_name_b))} differ): '
      'compare runs on the same data and split'
    )
  rows = []
  for r in rows_a:
    b = by_name_b[r['name']]
    row = {k: r[k] for k in ('i', 'name', 'img', 'words', 'refs', 'cls') if k in r}
    if 'att' in r:
      row['att'] = r['att']
    row['caption_b'] = ' '.join(b['words'])
    for key, _ in captioner.SCORES:
      row[f'{key}_a'], row[f'{key}_b'] = r[key], b[key]
      row[f'd_{key}'] = _delta(r[key], b[key])
    rows.append(row)
  summary = []
  for key, label in captioner.SCORES:
    pairs = [(r[f'{key}_a'], r[f'{key}_b']) for r in rows if r[f'{key}_a'] is not None and r[f'{key}_b'] is not None]
    if not pairs:
      continue
    ci = metrics_lib.paired_bootstrap_ci([a for a, _ in pairs], [b for _, b in pairs], num_resamples=resamples)
    better = sum(a > b for a, b in pairs)
    worse = sum(a < b for a, b in pairs)
    summary.append(
      [
        label,
        sum(a for a, _ in pairs) / len(pairs),
        sum(b for _, b in pairs) / len(pairs),
        ci['mean_diff'],
        page.Raw(f'[{ci["low"]:+.4f}, {ci["high"]:+.4f}]'),
        ci['p_a_not_better'],
        better,
        len(pairs) - better - worse,
        worse,
      ]
    )
  columns = [
    ('i', '#', 'index'),
    ('name', 'image', 'image'),
    ('caption', 'caption A', 'words'),
    ('caption_b', 'caption B', 'text'),
    ('refs', 'references', 'refs'),
  ]
  if any(r['cls'] for r in rows):
    columns.append(('cls', 'class', 'text'))
  columns += [('cider_a', 'CIDEr-D A', 'num'), ('cider_b', 'CIDEr-D B', 'num')]
  columns += [(f'd_{key}', f'Δ {label}', 'num') for key, label in captioner.SCORES]
  title = f'{os.path.basename(os.path.abspath(workdir_a))} vs {os.path.basename(os.path.abspath(workdir_b))}'
  body = '\n'.join(
    p
    for p in [
      f'<h1>Captions compared: {esc(title)}</h1>',
      f'<p class="sub">A = {esc(os.path.abspath(workdir_a))}<br>B = {esc(os.path.abspath(workdir_b))}</p>',
      '<h2 id="summary">Per-image means, A - B</h2>',
      page.table(
        ['metric', 'A', 'B', 'A - B', f'95% CI ({resamples:,} paired resamples)', 'P(A not better)']
        + ['A better', 'equal', 'B better'],
        summary,
        numeric={1, 2, 3, 4, 5, 6, 7, 8},
        attrs=' id="summary-table"',
      ),
      f'<p class="note">{esc(note)}</p>' if note else '',
      '<h2 id="table">Every test image (A worst against B first)</h2>',
      '<p>Δ is A - B. Click a column header to sort; type to filter by either caption, a reference, the image '
      'name or class. Hover over a word of caption A for its attention.</p>',
      captioner.interactive_table(rows, columns, side=side, page_size=page_size, sort='d_cider'),
    ]
    if p
  )
  return page.document(f'compare {title}', body, css=captioner.CSS, script=captioner.SCRIPT)


def write_comparison(workdir_a: str, workdir_b: str, out: str | None = None, **kwargs) -> str:
  """Writes the comparison page (default: <workdir_a>/compare_<name of B>.html); returns its path."""
  text = comparison_page(workdir_a, workdir_b, **kwargs)
  path = out or os.path.join(workdir_a, f'compare_{os.path.basename(os.path.abspath(workdir_b))}.html')
  io_utils.atomic_write(path, lambda f: f.write(text), binary=False)
  return path
