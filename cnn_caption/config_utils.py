"""Config checks that turn bad input into one clear line (see launch.py)."""

from __future__ import annotations

import math
import os
import re
import sys

from absl import app
from absl import flags
import ml_collections

from cnn_caption import profiling
from cnn_caption.errors import UserError


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _bad_override(argv: list[str], missing: str) -> str | None:
  """Finds the --config.a.b=... argument whose path contains the missing key."""
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)', arg)
    if m and missing in m.group(1).split('.'):
      return m.group(1)
  return None


def _load_config_file(argv: list[str]):
  """The config named by --config=path.py[:variant], loaded directly (used only to explain an error)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec_arg = next(a.split('=', 1)[1] for a in argv if a.startswith('--config='))
  path, _, variant = spec_arg.partition(':')
  spec = importlib.util.spec_from_file_location('_config_for_error', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _known_fields(argv: list[str], path: str, missing: str) -> str:
  """'known fields of config.X: a, b, c' for the group that lacks `missing`."""
  try:
    node = _load_config_file(argv)
    parents = path.split('.')[:path.split('.').index(missing)]
    for part in parents:
      node = node[part]
    return f'known fields of {".".join(["config"] + parents)}: {", ".join(sorted(node.keys()))}'
  except Exception:  # pylint: disable=broad-except
    return 'check the spelling against the config file'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports config override problems in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    detail = lines[-1] if 'Traceback' in str(e) else lines[0]
    head = lines[0].split(':')[0] if lines[0].startswith('flag --') else ''
    _fail(f'{head + ": " if head and head not in detail else ""}{detail}')
  except (AttributeError, KeyError) as e:
    missing = str(e).strip('"\'')
    path = _bad_override(argv, missing)
    if path is None:
      _fail(f'config error: {e}')
    _fail(f'--config.{path}: unknown config field {missing!r}; {_known_fields(argv, path, missing)}')
  except (ValueError, TypeError) as e:
    _fail(f'config override error: {e}')
  return argv  # unreachable


def run_app(main) -> None:
  """app.run with one-line errors for config overrides."""
  app.run(main, flags_parser=_parse_flags)


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
