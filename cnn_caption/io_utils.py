"""Atomic file writes: a crash or kill never leaves a half-written file under its final name."""

from __future__ import annotations

from collections.abc import Callable
import json
import math
import os
import shutil
import tempfile
from typing import Any, IO

import numpy as np

from cnn_caption.errors import UserError

TMP_PREFIX = '.tmp-'


def _umask() -> int:
  """The process umask, read without changing it where Linux allows (other threads may be creating files)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write(path: str, write_fn: Callable[[IO], Any], binary: bool = True) -> None:
  """Calls write_fn on a temporary file in path's folder, then renames it to path (mode 0666 & ~umask)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=TMP_PREFIX)
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
    with os.fdopen(fd, 'wb') if binary else os.fdopen(fd, 'w', encoding='utf-8') as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _jsonable(obj):
  """numpy scalars -> Python numbers, non-finite floats -> None (JSON has no NaN)."""
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


jsonable = _jsonable


def write_json(path: str, obj: Any) -> None:
  text = json.dumps(_jsonable(obj), indent=2, sort_keys=True) + '\n'
  atomic_write(path, lambda f: f.write(text), binary=False)


def write_jsonl(path: str, records: list[dict]) -> None:
  text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
  atomic_write(path, lambda f: f.write(text), binary=False)


def remove_stale_temporaries(directory: str, max_depth: int = 2) -> list[str]:
  """Removes `.tmp-*` files and orbax `*.orbax-checkpoint-tmp*` folders left by a killed save; returns them."""
  removed = []
  if not os.path.isdir(directory):
    return removed
  base_depth = directory.rstrip(os.sep).count(os.sep)
  for root, dirs, files in os.walk(directory):
    if root.count(os.sep) - base_depth >= max_depth:
      dirs[:] = []
    for name in files:
      if name.startswith(TMP_PREFIX):
        os.remove(os.path.join(root, name))
        removed.append(os.path.join(root, name))
    for name in list(dirs):
      if '.orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
        dirs.remove(name)
  return removed


# Every folder and file a run writes directly inside its workdir (sweeps add lr_<rate>/ members). A symbolic link
# at one of them would carry the writes out of the workdir (or, for a file, be silently replaced), so none may be.
WORKDIR_OUTPUTS = (
  '.lock',
  'captions',
  'checkpoints',
  'checkpoints_best',
  'checkpoints_damaged',
  'checkpoints_superseded',
  'config.json',
  'eval.jsonl',
  'features',
  'metrics.jsonl',
  'plots',
  'profile',
  'report',
  'report.html',
  'results.json',
  'synthetic_data',
  'tensorboard',
  'scene_classes.json',
  'test_attention.npz',
  'test_captions.json',
  'test_predictions.npz',
  'vocab.json',
)


def check_no_links(folder: str, names=WORKDIR_OUTPUTS) -> None:
  """UserError naming the first of folder/<name> that is a symbolic link: every write stays inside folder."""
  for name in names:
    path = os.path.join(folder, name)
    if os.path.islink(path):
      raise UserError(
        f'{path} is a symbolic link (to {os.readlink(path)}) and runs write only inside their folder; replace '
        'the link with a real folder or file (move what it points to aside first), or use another --workdir'
      )


def prepare_workdir(workdir: str, outputs=WORKDIR_OUTPUTS) -> None:
  """Creates workdir if needed; UserError if it is a file, cannot be created or written, or an output is a link."""
  if not workdir:
    raise UserError('the workdir is empty; pass --workdir=<folder>')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a folder; pass a folder (it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create --workdir={workdir} ({e.strerror}); choose a location you can write to') from None
  try:
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=TMP_PREFIX)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} is not writable ({e.strerror}); choose a location you can write to') from None
  check_no_links(workdir, outputs)


def append_jsonl(path: str, record: dict) -> None:
  """Appends one row (a line written in one call; readers skip a torn last line after a kill)."""
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(_jsonable(record), sort_keys=True) + '\n')
