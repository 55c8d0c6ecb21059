"""Config checks: bad input becomes a UserError naming the field and the fix (cli.py prints it)."""

from __future__ import annotations

import os

import jax
import ml_collections

from cnn_caption import tasks as tasks_lib
from cnn_caption.errors import UserError
from cnn_caption.tasks.base import check
from cnn_caption.tasks.base import finite_pos
from cnn_caption.tasks.base import get_field
from cnn_caption.tasks.base import int_in
from cnn_caption.tasks.base import nonneg
from cnn_caption.tasks.base import nonneg_int
from cnn_caption.tasks.base import pos_int
from cnn_caption.tasks.base import pos_ints
from cnn_caption.tasks.base import prob
from cnn_caption.training import profiling


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
_MODEL_SHAPES = (
  'model.input_shape',
  'model.kernel_size',
  'model.strides',
  'model.pool_window',
  'model.pool_strides',
  'model.channels',
  'model.convs_per_stage',
  'model.widths',
  'model.blocks',
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first impossible field: the fields every task shares, then config.task's own."""
  check(config, 'seed', int_in(0, 2**63), 'an integer in [0, 2**63)')
  for field in ('num_epochs', 'batch_size', 'eval_batch_size', 'steps_per_call', 'log_every_steps'):
    check(config, field, pos_int, 'a positive integer')
  check(config, 'early_stopping_patience', nonneg_int, 'an integer >= 0')
  check(config, 'optimizer.learning_rate', finite_pos, 'a finite number > 0')
  check(config, 'optimizer.momentum', lambda v: 0 <= v < 1, 'in [0, 1)')
  check(config, 'optimizer.weight_decay', nonneg, 'a finite number >= 0')
  check(config, 'optimizer.grad_clip_norm', nonneg, 'a finite number >= 0 (0 = off)')
  check(config, 'optimizer.warmup_steps', nonneg_int, 'an integer >= 0')
  check(config, 'optimizer.name', lambda v: v in ('sgd', 'adam', 'adamw'), "one of 'sgd', 'adam', 'adamw'")
  check(
    config,
    'optimizer.schedule',
    lambda v: v in ('constant', 'cosine', 'warmup_cosine', 'one_cycle'),
    "one of 'constant', 'cosine', 'warmup_cosine', 'one_cycle'",
  )
  check(config, 'optimizer.warmup_fraction', lambda v: prob(v) and v > 0, 'in (0, 1) (one_cycle only)')
  check(config, 'optimizer.accumulate_steps', pos_int, 'a positive integer (1 = no accumulation)')
  check(config, 'model.dropout', prob, 'in [0, 1)')
  for field in _MODEL_SIZES:
    check(config, field, pos_int, 'a positive integer')
  for field in _MODEL_SHAPES:
    check(config, field, pos_ints, 'a tuple of positive integers')
  check(config, 'model.name', lambda v: isinstance(v, str) and v != '', 'a model registry name')
  check(config, 'model.padding', lambda v: v in ('VALID', 'SAME'), "'VALID' or 'SAME'")
  check(config, 'checkpoint.max_to_keep', pos_int, 'a positive integer')
  check(config, 'checkpoint.every_steps', nonneg_int, 'an integer >= 0 (0 = epoch ends only)')
  check(config, 'checkpoint.restore_step', nonneg_int, 'an integer >= 0 (a saved step)')
  check(config, 'data.num_train', nonneg_int, 'an integer >= 0 (0 = all)')
  check(config, 'data.num_eval', nonneg_int, 'an integer >= 0 (0 = all)')
  check(config, 'eval_every_steps', nonneg_int, 'an integer >= 0 (0 = at epoch ends only)')
  check(config, 'ema_decay', prob, 'in [0, 1) (0 = no EMA)')
  check(config, 'test_params', lambda v: v in ('raw', 'ema'), "'raw' or 'ema'")
  if get_field(config, 'test_params') == 'ema' and not get_field(config, 'ema_decay'):
    raise UserError(
      "config.test_params='ema' needs an EMA: set --config.ema_decay (e.g. 0.999) or --config.test_params=raw"
    )
  profiling.check_profile_steps(get_field(config, 'profile_steps') or ())
  check_xla_options(get_field(config, 'xla_options'))
  check_xla_options(get_field(config, 'eval_xla_options'), 'eval_xla_options')
  for i, lr in enumerate(get_field(config, 'sweep.learning_rates') or ()):
    if not finite_pos(lr):
      raise UserError(f'config.sweep.learning_rates[{i}]={lr!r} is invalid: each must be > 0')
  init_from = get_field(config, 'init_from')
  if init_from is not None and not os.path.isdir(init_from):
    raise UserError(
      f'config.init_from={init_from!r} is not a directory; point it at a finished captioning training workdir'
    )
  data_dir = get_field(config, 'data.dir')
  if data_dir is not None and not os.path.isdir(data_dir):
    raise UserError(
      f'config.data.dir={data_dir!r} is not a directory; point --config.data.dir at the folder that holds the data'
    )
  if get_field(config, 'task') is not None:
    tasks_lib.task_class(config.task).validate_config(config)


def xla_options(text: str | None, field: str = 'xla_options') -> dict[str, str | bool]:
  """config.xla_options ('name=value,name=value') as jax.jit compiler options; {} when empty or None.

  'true' / 'false' become booleans; every other value stays text, which XLA parses by the option's type. A
  list value keeps its commas: an item that is neither name=value nor an option name continues the value
  before it (xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE).
  field: the config field the text came from, named in errors (xla_options or eval_xla_options).
  """
  options, last = {}, None
  for item in (text or '').split(','):
    if not item.strip():
      continue
    name, sep, value = item.strip().partition('=')
    if not sep and last is not None and not name.startswith('xla_') and isinstance(options[last], str):
      options[last] = f'{options[last]},{name}'
      continue
    if not sep or not name.startswith('xla_'):
      raise UserError(
        f'config.{field} item {item.strip()!r} is not name=value with an XLA option name (xla_...); '
        f"e.g. --config.{field}='xla_cpu_experimental_ynn_fusion_type=,xla_cpu_use_onednn=true'"
      )
    lowered = value.strip().lower()
    options[name] = lowered == 'true' if lowered in ('true', 'false') else value.strip()
    last = name
  return options


def compiler_options(config: ml_collections.ConfigDict, field: str = 'xla_options') -> dict[str, str | bool] | None:
  """config.<field> (xla_options: the train step; eval_xla_options: evaluation) as jax.jit's compiler_options."""
  return xla_options(config.get(field), field) or None


def check_xla_options(text: str | None, field: str = 'xla_options') -> None:
  """UserError naming the option XLA refuses (unknown name, value of the wrong type); compiles x + 1 to ask it."""
  options = xla_options(text, field)
  if not options:
    return
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError: INVALID_ARGUMENT from XLA)
    reason = str(e).splitlines()[0].split('INVALID_ARGUMENT: ')[-1]
    raise UserError(
      f'config.{field}={text!r}: XLA refuses it ({reason}); fix or drop that option '
      '(the names are XLA DebugOptions fields, e.g. xla_cpu_use_onednn=true)'
    ) from None


# Fields that only change what is reported, how fast, or where files are: a resume may change them.
RESUME_SAFE_FIELDS = (
  'log_every_steps',
  'eval_batch_size',
  'eval_xla_options',  # evaluation and decoding only: the training steps are the same
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


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as in JSON)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


def computation_differences(saved: dict, current: dict) -> list[str]:
  """'field: saved -> now' for each field that changes the trained numbers (RESUME_SAFE_FIELDS skipped)."""
  old, new = flatten(saved), flatten(current)
  diffs = []
  for path in sorted(set(old) | set(new)):
    if any(path == f or path.startswith(f + '.') for f in RESUME_SAFE_FIELDS) or old.get(path) == new.get(path):
      continue
    if path not in old and new[path] in (False, 0, None, ''):
      continue  # a switch added after the checkpoint was written, left off (False / 0 / ''): the computation it had
    if path == 'num_epochs' and new.get('optimizer.schedule', 'constant') == 'constant':
      continue  # more (or fewer) epochs at a constant rate: the steps already taken stay the same
    if path == 'optimizer.warmup_fraction' and new.get('optimizer.schedule') != 'one_cycle':
      continue  # read by the one_cycle schedule alone
    diffs.append(f'{path}: {old.get(path, "<absent>")!r} -> {new.get(path, "<absent>")!r}')
  return diffs
