"""Config checks: bad input becomes a UserError naming the field and the fix (cli.py prints it)."""

from __future__ import annotations

import math
import os

import ml_collections

from cnn_caption import metrics
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
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
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
    raise UserError(f'config.{path}={value!r} is invalid: it must be {requirement} (set --config.{path}=...)')


def _finite_pos(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# Positive layer sizes wherever a config has them (None = a placeholder left unset, which is allowed).
_MODEL_SIZES = (
  'model.num_classes',
  'model.hidden_dim',
  'model.embed_dim',
  'model.attention_dim',
  'model.hidden_units',
  'model.features',
  'model.head_dim',
  'model.num_heads',
  'model.hidden',
  'model.groups',
  'model.space_to_depth',
  'model_inputs.num_regions',
  'model_inputs.feature_dim',
  'model_inputs.vocab_size',
)
_FASHION_MNIST_SHAPE = (28, 28, 1)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first impossible field."""
  pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  nonneg_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  nonneg = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
  prob = lambda v: isinstance(v, (int, float)) and 0 <= v < 1
  int_in = lambda lo, hi: lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi
  pos_ints = lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(pos_int(x) for x in v)
  _check(config, 'seed', int_in(0, 2**63), 'an integer in [0, 2**63)')
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
  _check(
    config,
    'optimizer.schedule',
    lambda v: v in ('constant', 'cosine', 'warmup_cosine'),
    "one of 'constant', 'cosine', 'warmup_cosine'",
  )
  _check(config, 'model.dropout', prob, 'in [0, 1)')
  _check(config, 'loss.label_smoothing', prob, 'in [0, 1) (0 = off)')
  _check(config, 'loss.scheduled_sampling', prob, 'in [0, 1) (0 = off)')
  _check(config, 'model.encoder_head_dim', nonneg_int, 'an integer >= 0 (0 = off; 1280 fine-tunes the head)')
  _check(config, 'checkpoint.max_to_keep', pos_int, 'a positive integer')
  _check(config, 'checkpoint.every_steps', nonneg_int, 'an integer >= 0 (0 = epoch ends only)')
  _check(config, 'data.num_train', nonneg_int, 'an integer >= 0 (0 = all)')
  _check(config, 'data.num_eval', nonneg_int, 'an integer >= 0 (0 = all)')
  _check(config, 'data.synthetic_num_images', pos_int, 'a positive integer')
  _check(config, 'encoder.batch_size', pos_int, 'a positive integer')
  for field in _MODEL_SIZES:
    _check(config, field, pos_int, 'a positive integer')
  for field in (
    'model.input_shape',
    'model.kernel_size',
    'model.strides',
    'model.pool_window',
    'model.pool_strides',
    'model.channels',
    'model.convs_per_stage',
  ):
    _check(config, field, pos_ints, 'a tuple of positive integers')
  _check(config, 'model.name', lambda v: isinstance(v, str) and v != '', 'a model registry name')
  _check(
    config,
    'decoding.length_penalty',
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    'a finite number',
  )
  _check(config, 'checkpoint.restore_step', nonneg_int, 'an integer >= 0 (a saved step)')
  if _get(config, 'task') == 'classification':
    shape = tuple(_get(config, 'model.input_shape') or _FASHION_MNIST_SHAPE)
    if shape != _FASHION_MNIST_SHAPE:
      raise UserError(
        f'config.model.input_shape={shape} does not match the Fashion-MNIST images '
        f'{_FASHION_MNIST_SHAPE}; set --config.model.input_shape="{_FASHION_MNIST_SHAPE}"'
      )
  _check(config, 'data.on_error', lambda v: v in ('raise', 'skip'), "'raise' or 'skip'")
  _check(config, 'data.image_size', pos_int, 'a positive integer')
  _check(config, 'data.max_caption_len', pos_int, 'a positive integer')
  _check(config, 'data.min_word_count', pos_int, 'a positive integer')
  _check(config, 'model.attention_act', lambda v: v in ('relu', 'tanh'), "'relu' or 'tanh'")
  _check(config, 'decoding.method', lambda v: v in ('greedy', 'beam'), "'greedy' or 'beam'")
  _check(config, 'decoding.beam_size', pos_int, 'a positive integer')
  _check(config, 'decoding.max_len', pos_int, 'a positive integer')
  _check(config, 'decoding.val_beam_sizes', lambda v: not v or pos_ints(v), 'a tuple of positive beam sizes')
  _check(
    config,
    'decoding.val_length_penalties',
    lambda v: all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v),
    'a tuple of finite numbers',
  )
  _check(config, 'data.augment_pad', nonneg_int, 'an integer >= 0 (0 = no random crops)')
  _check(config, 'data.bn_stats_examples', pos_int, 'a positive integer (training images for BatchNorm statistics)')
  _check(config, 'loss.doubly_stochastic', nonneg, 'a finite number >= 0 (0 = off)')
  _check(config, 'model.padding', lambda v: v in ('VALID', 'SAME'), "'VALID' or 'SAME'")
  _check(
    config,
    'selection_metric',
    lambda v: v in metrics.VALIDATION_METRICS,
    f'one of {", ".join(metrics.VALIDATION_METRICS)} (METEOR is computed at test only)',
  )
  _check(config, 'eval_every_steps', nonneg_int, 'an integer >= 0 (0 = at epoch ends only)')
  _check(config, 'optimizer.accumulate_steps', pos_int, 'a positive integer (1 = no accumulation)')
  _check(config, 'ema_decay', prob, 'in [0, 1) (0 = no EMA)')
  _check(config, 'test_params', lambda v: v in ('raw', 'ema'), "'raw' or 'ema'")
  if _get(config, 'test_params') == 'ema' and not _get(config, 'ema_decay'):
    raise UserError(
      "config.test_params='ema' needs an EMA: set --config.ema_decay (e.g. 0.999) or --config.test_params=raw"
    )
  profiling.check_profile_steps(_get(config, 'profile_steps') or ())
  for i, lr in enumerate(_get(config, 'sweep.learning_rates') or ()):
    if not _finite_pos(lr):
      raise UserError(f'config.sweep.learning_rates[{i}]={lr!r} is invalid: each must be > 0')
  _check(config, 'scst.num_samples', int_in(2, 2**16), 'an integer >= 2 (samples per image)')
  _check(config, 'scst.baseline', lambda v: v in ('mean', 'greedy'), "'mean' or 'greedy'")
  init_from = _get(config, 'init_from')
  if init_from is not None and not os.path.isdir(init_from):
    raise UserError(
      f'config.init_from={init_from!r} is not a directory; point it at a finished captioning training workdir'
    )
  data_dir = _get(config, 'data.dir')
  if data_dir is not None and not os.path.isdir(data_dir):
    raise UserError(
      f'config.data.dir={data_dir!r} is not a directory; point --config.data.dir at the folder that holds the data'
    )


# Fields that only change what is reported, how fast, or where files are: a resume may change them.
RESUME_SAFE_FIELDS = (
  'log_every_steps',
  'eval_batch_size',
  'steps_per_call',
  'early_stopping_patience',
  'meteor_at_test',
  'checkpoint',
  'decoding',
  'sweep',
  'model_inputs',
  'data.dir',
  'data.image_dir',
  'data.synthetic_dir',
  'data.on_error',
  'encoder.cache_dir',
  'encoder.batch_size',
  'encoder.weights',
)


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


def computation_differences(saved: dict, current: dict) -> list[str]:
  """'field: saved -> now' for each field that changes the trained numbers (RESUME_SAFE_FIELDS skipped)."""
  old, new = _flatten(saved), _flatten(current)
  diffs = []
  for path in sorted(set(old) | set(new)):
    if any(path == f or path.startswith(f + '.') for f in RESUME_SAFE_FIELDS) or old.get(path) == new.get(path):
      continue
    if path not in old and new[path] in (False, 0, None):
      continue  # a switch added after the checkpoint was written, left off (False / 0): the computation it had
    if path == 'num_epochs' and new.get('optimizer.schedule', 'constant') == 'constant':
      continue  # more (or fewer) epochs at a constant rate: the steps already taken stay the same
    diffs.append(f'{path}: {old.get(path, "<absent>")!r} -> {new.get(path, "<absent>")!r}')
  return diffs
