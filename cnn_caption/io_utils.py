"""Atomic file writes: a crash or kill never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, IO

import numpy as np


def atomic_write(path: str, write_fn: Callable[[IO], Any], binary: bool = True) -> None:
  """Calls write_fn on a temporary file in path's folder, then renames it to path."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp-')
  try:
    with (os.fdopen(fd, 'wb') if binary else os.fdopen(fd, 'w', encoding='utf-8')) as f:
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


def append_jsonl(path: str, record: dict) -> None:
  """Appends one row (a line written in one call; readers skip a torn last line after a kill)."""
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(_jsonable(record), sort_keys=True) + '\n')
