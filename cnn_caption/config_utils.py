"""Config checks: bad input becomes a UserError naming the field and the fix (cli.py prints it)."""

from __future__ import annotations

import math
import os

import ml_collections

from cnn_caption import profiling
from cnn_caption.errors import UserError


def require_config(config) -> ml_collections.ConfigDict:
  """The loaded --config, or a clear error when it is missing or failed to load."""
  if config is None:
    raise UserError('--config is required, e.g. --config=configs/classifier.py')
  if not isinstance(config, ml_collections.ConfigDict):
    try:
      error = object.__getattribute__(config, '_error')  # ml_collections' _ErrorConfig keeps the cause
    except AttributeError:
      raise UserError('--config did not give a ConfigDict') from None
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    raise UserError(f'--config could not be loaded: {lines[-1]}')
  return config


def require_workdir(workdir: str | None, mode: str) -> str:
  if not workdir:
    raise UserError(f'--workdir is required for --mode={mode}, e.g. --workdir=runs/fmnist')
  return workdir


def _get(config, path: str):
  node = config
  for part in path.split('.'):
    if part not in node:
      return None
    node = node[part]
  return node


def _check(config, path: str, ok, requirement: str) -> None:
  value = _get(config, path)
  if value is None:
    return
  try:
    good = ok(value)
  except TypeError:
    good = False
  if not good:
    raise UserError(f'config.{path}={value!r} is invalid: it must be {requirement} '
                    f'(set --config.{path}=...)')


def _finite_pos(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first impossible field."""
  pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  nonneg_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  nonneg = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
  prob = lambda v: isinstance(v, (int, float)) and 0 <= v < 1
  _check(config, 'num_epochs', pos_int, 'a positive integer')
  _check(config, 'batch_size', pos_int, 'a positive integer')
  _check(config, 'eval_batch_size', pos_int, 'a positive integer')
  _check(config, 'steps_per_call', pos_int, 'a positive integer')
  _check(config, 'log_every_steps', pos_int, 'a positive integer')
  _check(config, 'early_stopping_patience', nonneg_int, 'an integer >= 0')
  _check(config, 'optimizer.learning_rate', _finite_pos, 'a finite number > 0')
  _check(config, 'optimizer.momentum', lambda v: 0 <= v < 1, 'in [0, 1)')
  _check(config, 'optimizer.weight_decay', nonneg, 'a finite number >= 0')
  _check(config, 'optimizer.grad_clip_norm', nonneg, 'a finite number >= 0 (0 = off)')
  _check(config, 'optimizer.warmup_steps', nonneg_int, 'an integer >= 0')
  _check(config, 'optimizer.name', lambda v: v in ('sgd', 'adam', 'adamw'), "one of 'sgd', 'adam', 'adamw'")
  _check(config, 'optimizer.schedule', lambda v: v in ('constant', 'cosine', 'warmup_cosine'),
         "one of 'constant', 'cosine', 'warmup_cosine'")
  _check(config, 'model.dropout', prob, 'in [0, 1)')
  _check(config, 'checkpoint.max_to_keep', pos_int, 'a positive integer')
  _check(config, 'checkpoint.every_steps', nonneg_int, 'an integer >= 0 (0 = epoch ends only)')
  _check(config, 'data.num_train', nonneg_int, 'an integer >= 0 (0 = all)')
  _check(config, 'data.on_error', lambda v: v in ('raise', 'skip'), "'raise' or 'skip'")
  _check(config, 'data.image_size', pos_int, 'a positive integer')
  _check(config, 'data.max_caption_len', pos_int, 'a positive integer')
  _check(config, 'data.min_word_count', pos_int, 'a positive integer')
  _check(config, 'model.attention_act', lambda v: v in ('relu', 'tanh'), "'relu' or 'tanh'")
  _check(config, 'decoding.method', lambda v: v in ('greedy', 'beam'), "'greedy' or 'beam'")
  _check(config, 'decoding.beam_size', pos_int, 'a positive integer')
  _check(config, 'decoding.max_len', pos_int, 'a positive integer')
  _check(config, 'eval_every_steps', nonneg_int, 'an integer >= 0 (0 = at epoch ends only)')
  _check(config, 'optimizer.accumulate_steps', pos_int, 'a positive integer (1 = no accumulation)')
  _check(config, 'ema_decay', prob, 'in [0, 1) (0 = no EMA)')
  _check(config, 'test_params', lambda v: v in ('raw', 'ema'), "'raw' or 'ema'")
  if _get(config, 'test_params') == 'ema' and not _get(config, 'ema_decay'):
    raise UserError("config.test_params='ema' needs an EMA: set --config.ema_decay (e.g. 0.999) or "
                    "--config.test_params=raw")
  profiling.check_profile_steps(_get(config, 'profile_steps') or ())
  for i, lr in enumerate(_get(config, 'sweep.learning_rates') or ()):
    if not _finite_pos(lr):
      raise UserError(f'config.sweep.learning_rates[{i}]={lr!r} is invalid: each must be > 0')
  data_dir = _get(config, 'data.dir')
  if data_dir is not None and not os.path.isdir(data_dir):
    raise UserError(f'config.data.dir={data_dir!r} is not a directory; '
                    'point --config.data.dir at the folder that holds the data')
