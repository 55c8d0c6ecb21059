"""What a report reads from a workdir: the run's own files, nothing else (no trainer, no task)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from cnn_caption.errors import UserError

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
EVAL_FILE = 'eval.jsonl'
RESULTS_FILE = 'results.json'
REPORT_FILE = 'report.html'


def read_json(path: str) -> Any | None:
  """The JSON in path, or None when the file is absent; UserError naming the file when it is unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: unreadable ({e}); repair it or rerun the run that wrote it') from None


def read_jsonl(path: str) -> list[dict] | None:
  """The rows of a .jsonl file (a torn last line, left by a kill, skipped), or None when it is absent."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise UserError(f'{path}: unreadable ({e.strerror}); check the permissions') from None
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1:
        break  # written while the run was killed
      raise UserError(f'{path}: line {i + 1} is not JSON; repair the file or rerun the run') from None
  return rows


@dataclasses.dataclass
class Run:
  """One training run's files as read from its workdir."""

  workdir: str
  config: dict  # config.json, else results.json's copy
  history: list[dict]  # metrics.jsonl: one row per finished epoch
  evals: list[dict]  # eval.jsonl: one row per evaluation ([] when absent)
  results: dict | None  # results.json; None while the run is unfinished

  @property
  def task(self) -> str:
    return str(self.config.get('task', 'unknown'))

  @property
  def finished(self) -> bool:
    return self.results is not None

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)


def is_sweep(workdir: str) -> bool:
  """A learning-rate sweep's parent folder: its results.json lists the member runs."""
  results = read_json(os.path.join(workdir, RESULTS_FILE))
  return isinstance(results, dict) and isinstance(results.get('runs'), list)


def load_run(workdir: str) -> Run:
  """The run in workdir; UserError in one line when it is not a training workdir."""
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is not a folder; pass the workdir of a training run')
  config = read_json(os.path.join(workdir, CONFIG_FILE))
  history = read_jsonl(os.path.join(workdir, METRICS_FILE))
  results = read_json(os.path.join(workdir, RESULTS_FILE))
  if config is None and isinstance(results, dict):
    config = results.get('config')
  if config is None or (history is None and results is None):
    missing = [n for n, v in ((CONFIG_FILE, config), (METRICS_FILE, history), (RESULTS_FILE, results)) if v is None]
    raise UserError(
      f'{workdir} has no {" / ".join(missing)}: not a training workdir (or one whose run has not started); '
      'pass the --workdir of a run that has trained at least one epoch'
    )
  if not isinstance(config, dict) or (results is not None and not isinstance(results, dict)):
    raise UserError(f'{workdir}: config.json or results.json is not a JSON object; rerun the training to rewrite it')
  return Run(workdir, config, history or [], read_jsonl(os.path.join(workdir, EVAL_FILE)) or [], results)
