"""Sections every run's report has: the run at a glance and its training curves."""

from __future__ import annotations

import os
import re

from cnn_caption.report import charts
from cnn_caption.report import page
from cnn_caption.report.files import Run
from cnn_caption.report.page import esc

# Top-level results.json entries shown elsewhere (or too long for the figures table).
_NOT_FIGURES = ('config', 'environment', 'decoding', 'num_images', 'runs', 'best')
_METRIC_NAMES = {
  'accuracy': 'accuracy',
  'loss': 'loss',
  'cider': 'CIDEr-D',
  'rouge_l': 'ROUGE-L',
  'meteor': 'METEOR',
  'bleu4_sentence_mean': 'mean sentence BLEU-4',
}


def metric_name(key: str) -> str:
  m = re.fullmatch(r'bleu(\d)', key)
  return f'BLEU-{m.group(1)}' if m else _METRIC_NAMES.get(key, key)


def _figure_order(key: str) -> tuple[int, str]:
  for rank, prefix in enumerate(('test_', 'best_', 'val_', 'train_')):
    if key.startswith(prefix):
      return rank, key
  return 4, key


def glance(run: Run) -> str:
  """Title, status, final and best figures, time, environment and the resolved config."""
  config, results, history = run.config, run.results or {}, run.history
  num_epochs = config.get('num_epochs')
  status = (
    f'finished: {len(history)} epoch{"s" if len(history) != 1 else ""}'
    if run.finished
    else f'in progress or stopped: {len(history)} of {num_epochs} epochs, no results.json yet'
  )
  model = (config.get('model') or {}).get('name')
  parts = [
    f'<h1>{esc(run.task)} run: {esc(os.path.basename(os.path.abspath(run.workdir)))}</h1>',
    f'<p class="sub">{esc(os.path.abspath(run.workdir))} · model {esc(model)} · {esc(status)}</p>',
    '<h2 id="glance">The run at a glance</h2>',
  ]
  figures = sorted(
    (k, v)
    for k, v in results.items()
    if k not in _NOT_FIGURES and (v is None or isinstance(v, (int, float, str))) and k != 'test_params'
  )
  figures.sort(key=lambda kv: _figure_order(kv[0]))
  if not run.finished:
    parts.append('<p class="note">No results.json yet: test figures appear when the run finishes.</p>')
    if history:
      last = history[-1]
      figures = [(k, v) for k, v in last.items() if k not in ('seconds', 'eval_seconds')]
  train_seconds = sum(float(r.get('seconds') or 0) for r in history)
  eval_seconds = sum(float(r.get('eval_seconds') or 0) for r in history)
  timing = [
    ('training time (sum of epochs)', page.Raw(esc(page.seconds_text(results.get('train_seconds', train_seconds))))),
    ('validation time', page.Raw(esc(page.seconds_text(eval_seconds)))),
    ('epochs', len(history)),
    ('batch size', config.get('batch_size')),
    ('optimizer', page.Raw(esc(_optimizer_text(config)))),
  ]
  if 'test_params' in results:
    timing.append(('tested parameters', page.Raw(esc(results['test_params']))))
  parts.append('<div class="figs">')
  parts.append(f'<div><h3>Figures</h3>{page.key_values(figures)}</div>')
  parts.append(f'<div><h3>Time and setup</h3>{page.key_values(timing)}</div>')
  env = dict(results.get('environment') or {})
  if 'devices' in results:
    env.setdefault('device_count', results['devices'])
  if env:
    parts.append(f'<div><h3>Environment</h3>{page.key_values(sorted(env.items()))}</div>')
  parts.append('</div>')
  for key in ('decoding', 'num_images'):
    if isinstance(results.get(key), dict):
      parts.append(page.details(key, page.json_block(results[key])))
  parts.append(page.details('config (config.json, resolved)', page.json_block(config)))
  return '\n'.join(parts)


def _optimizer_text(config: dict) -> str:
  opt = config.get('optimizer') or {}
  if not opt:
    return '–'
  text = f'{opt.get("name")} lr {opt.get("learning_rate")}'
  if opt.get('schedule') and opt.get('schedule') != 'constant':
    text += f', {opt["schedule"]} schedule'
  return text


def _metric_groups(keys: set[str]) -> list[list[str]]:
  """Validation metrics grouped one chart each; BLEU-1..4 share one; the loss is drawn with training's."""
  names = sorted(k for k in keys if k != 'loss')
  bleu = [k for k in names if re.fullmatch(r'bleu\d', k)]
  groups = [[k] for k in names if k not in bleu]
  if bleu:
    groups.insert(0, bleu)
  return groups


def curves(run: Run, selection_metric: str | None = None) -> str:
  """Training loss and every validation metric per epoch (metrics.jsonl) and per evaluation (eval.jsonl)."""
  history, evals = run.history, run.evals
  if not history and not evals:
    return '<h2 id="curves">Curves</h2><p class="note">No finished epoch yet.</p>'
  extra_evals = len(evals) > len(history)  # evaluations within epochs (config.eval_every_steps)
  out = []
  loss = {'train (epoch mean)': [(r['epoch'], r.get('train_loss')) for r in history]}
  if any('val_loss' in r for r in history):
    loss['val'] = [(r['epoch'], r.get('val_loss')) for r in history]
  if any('val_ema_loss' in r for r in history):
    loss['val, EMA'] = [(r['epoch'], r.get('val_ema_loss')) for r in history]
  if extra_evals and any('val_loss' in r for r in evals):
    loss['val, every evaluation'] = [(r['epoch'], r.get('val_loss')) for r in evals]
  out.append(charts.line_chart(loss, 'loss', dashed=('val, every evaluation',)))
  keys = {k[4:] for r in history + evals for k in r if k.startswith('val_') and not k.startswith('val_ema_')}
  groups = _metric_groups(keys)
  if selection_metric:
    groups.sort(key=lambda g: selection_metric not in g)
  for group in groups:
    series = {}
    for key in group:
      label = metric_name(key) if len(group) > 1 else 'val'
      series[label] = [(r['epoch'], r.get(f'val_{key}')) for r in history]
      if any(f'val_ema_{key}' in r for r in history):
        series[f'{label}, EMA'] = [(r['epoch'], r.get(f'val_ema_{key}')) for r in history]
      if extra_evals:
        series[f'{label}, every evaluation'] = [(r['epoch'], r.get(f'val_{key}')) for r in evals]
    title = 'validation ' + (' / '.join(metric_name(k) for k in group) if len(group) > 1 else metric_name(group[0]))
    out.append(charts.line_chart(series, title, dashed=[n for n in series if n.endswith('every evaluation')]))
  figures = ''.join(f'<figure>{svg}</figure>' for svg in out if svg)
  note = (
    '<p class="sub">Solid: per epoch (metrics.jsonl); dashed: every evaluation (eval.jsonl).</p>' if extra_evals else ''
  )
  return f'<h2 id="curves">Curves</h2>{note}<div class="figs">{figures}</div>'
