"""The per-run report page: <workdir>/report.html, one self-contained file (no server, no network).

It reads only the workdir's files (config.json, metrics.jsonl, eval.jsonl, results.json and the task's
test outputs), so it works on any run, finished or not, old or new.
"""

from __future__ import annotations

import os

from cnn_caption import io_utils
from cnn_caption.report import captioner
from cnn_caption.report import classifier
from cnn_caption.report import compare
from cnn_caption.report import files
from cnn_caption.report import page
from cnn_caption.report import sections
from cnn_caption.report import sweep

CAPTIONING_TASKS = ('captioning', 'scst')
write_comparison = compare.write_comparison


def run_page(workdir: str, *, page_size: int = captioner.PAGE_SIZE, thumb_size: int | None = None) -> str:
  """The report of one run as HTML text; UserError when workdir is not a training workdir."""
  run = files.load_run(workdir)
  selection = run.config.get('selection_metric') or ('accuracy' if run.task == 'classification' else 'bleu4')
  body = [sections.glance(run), sections.curves(run, selection)]
  css, script = '', ''
  if run.task == 'classification':
    body.append(classifier.section(run))
  elif run.task in CAPTIONING_TASKS:
    html, script = captioner.section(run, page_size, thumb_size)
    body.append(html)
    css = captioner.CSS
  name = os.path.basename(os.path.abspath(workdir))
  return page.document(f'{run.task} report: {name}', '\n'.join(body), css=css, script=script)


def write_report(workdir: str, **kwargs) -> str:
  """Writes <workdir>/report.html (a run's, or a sweep's comparing its members); returns its path."""
  text = sweep.sweep_page(workdir) if files.is_sweep(workdir) else run_page(workdir, **kwargs)
  path = os.path.join(workdir, files.REPORT_FILE)
  io_utils.atomic_write(path, lambda f: f.write(text), binary=False)
  return path
