"""The command line: flag parsing with one-line errors, and the modes that print.

This is the only module that prints or exits; everything it calls returns data or raises UserError,
which `main` turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from cnn_caption import config_utils
from cnn_caption import errors
from cnn_caption import inference
from cnn_caption import io_utils
from cnn_caption import plots
from cnn_caption import report
from cnn_caption import sweep
from cnn_caption import tasks as tasks_lib
from cnn_caption import train as train_lib
from cnn_caption.analysis import attention_check as check_lib
from cnn_caption.analysis import equivariance
from cnn_caption.analysis import layer_tables
from cnn_caption.errors import UserError
from cnn_caption.models import imagenet
from cnn_caption.tasks import captioning as captioning_task
from cnn_caption.training import parallel

MODES = (
  'train',
  'summary',
  'attention_check',
  'equivariance_check',
  'imagenet_predict',
  'caption',
  'baselines',
  'report',
  'compare',
)
ENV_COORDINATOR = 'CNN_CAPTION_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'CNN_CAPTION_NUM_PROCESSES'
ENV_PROCESS_ID = 'CNN_CAPTION_PROCESS_ID'
# Compilations shorter than this are cached too: the smoke programs take well under JAX's default of 1 s,
# and a first result on a small config is mostly compilation.
CACHE_MIN_COMPILE_SECS = 0.0


@dataclasses.dataclass
class Distributed:
  """How this process joins a multi-process run (flags; None falls back to the environment)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  timeout_s: int = 300

  def resolved(self) -> Distributed:
    """Unset fields from the CNN_CAPTION_* environment variables; UserError if one is not a number."""

    def env_int(name: str) -> int | None:
      value = os.environ.get(name)
      if value is None or value == '':
        return None
      try:
        return int(value)
      except ValueError:
        raise UserError(f'${name}={value!r} is not an integer') from None

    return Distributed(
      self.coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
      self.num_processes if self.num_processes is not None else env_int(ENV_NUM_PROCESSES),
      self.process_id if self.process_id is not None else env_int(ENV_PROCESS_ID),
      self.auto,
      self.timeout_s,
    )


def _jax_option_given(name: str) -> bool:
  """Whether the user set a jax option: its --jax_* flag on the command line or its JAX_* variable."""
  given_as_flag = flags.FLAGS.is_parsed() and name in flags.FLAGS and flags.FLAGS[name].present
  return bool(given_as_flag) or name.upper() in os.environ


def compilation_cache_dir(flag_value: str | None) -> str | None:
  """Where compiled programs are kept between runs (None: not kept).

  --compilation_cache_dir when given ('' turns the cache off); else jax's own setting
  (--jax_compilation_cache_dir or $JAX_COMPILATION_CACHE_DIR); else the user's cache folder,
  $XDG_CACHE_HOME/cnn_caption/jax or ~/.cache/cnn_caption/jax.
  """
  if flag_value is not None:
    return flag_value or None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'cnn_caption', 'jax')


def use_compilation_cache(directory: str | None) -> None:
  """Turns jax's persistent compilation cache on in `directory` (off for None); call before any compilation."""
  if directory is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', directory)
  if not _jax_option_given('jax_persistent_cache_min_compile_time_secs'):
    jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECS)


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
  import importlib.util

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
    parents = path.split('.')[: path.split('.').index(missing)]
    for part in parents:
      node = node[part]
    return f'known fields of {".".join(["config"] + parents)}: {", ".join(sorted(node.keys()))}'
  except Exception:
    return 'check the spelling against the config file'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports config override problems in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
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


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
  """--mode=train: one run, or the learning-rate sweep when config.sweep.learning_rates is set."""
  if 'task' not in config:
    raise UserError(
      f'this config (model {config.get("model", {}).get("name")!r}) has no config.task, so it '
      'cannot be trained; use it with --mode=summary or --mode=attention_check, or train '
      'configs/classifier.py or configs/captioner.py'
    )
  if config.get('sweep') and config.sweep.get('learning_rates'):
    if jax.process_count() > 1:
      raise UserError(
        'the learning-rate sweep (config.sweep.learning_rates) runs its members as child processes '
        'and cannot span several processes; run it as one process, or train each rate as its own '
        'multi-process run: --config.sweep.learning_rates=() --config.optimizer.learning_rate=R'
      )
    sweep.run_sweep(config, workdir)
  else:
    train_lib.train_and_evaluate(config, workdir)
  return 0


def summary(config: ml_collections.ConfigDict) -> int:
  """--mode=summary: the per-layer tables of the configured model (and its encoder)."""
  for i, (title, rows) in enumerate(layer_tables.model_tables(config)):
    print(('\n' if i else '') + title)
    print(layer_tables.format_table(rows))
  return 0


def _report_checks(header: str, checks) -> int:
  """Prints a header, one PASS/FAIL line per check and the tally; exit code 0 only if all pass."""
  print(header)
  for c in checks:
    print(f'  [{"PASS" if c.passed else "FAIL"}] {c.name}: {c.detail}')
  failed = sum(not c.passed for c in checks)
  print(f'{len(checks) - failed} of {len(checks)} checks passed.')
  return 1 if failed else 0


def attention_check(config: ml_collections.ConfigDict) -> int:
  """--mode=attention_check: PASS/FAIL per identity; exit 0 only if all pass."""
  return _report_checks(check_lib.describe(config), check_lib.attention_checks(config))


def equivariance_check(config: ml_collections.ConfigDict) -> int:
  """--mode=equivariance_check: question 2.1, PASS/FAIL per statement with its measured difference."""
  return _report_checks(equivariance.describe(config), equivariance.equivariance_checks(config))


def imagenet_predict(config: ml_collections.ConfigDict, image_paths: list[str]) -> int:
  """--mode=imagenet_predict: top-5 classes per image; a bad image gets one stderr line and exit code 2."""
  if not image_paths:
    raise UserError('--mode=imagenet_predict needs --images=a.jpg,b.png')
  predictor = imagenet.Predictor(config)
  failed = 0
  for path in image_paths:
    try:
      top5 = predictor.top5(path)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      failed += 1
      continue
    print(f'{path}:')
    for rank, (index, name, prob) in enumerate(top5, start=1):
      print(f'  {rank}. {index:4d} {name:<30s} {prob:.3f}')
  return 2 if failed else 0  # a bad image is bad input: the same code as a UserError


def _attention_map_paths(workdir: str, image_paths: list[str]) -> list[str]:
  """workdir/captions/<name>.png per image; a name seen before in this call gets -2, -3, ... (never overwritten)."""
  out, used = [], set()
  for path in image_paths:
    stem = os.path.splitext(os.path.basename(path))[0] or 'image'
    name, n = stem, 1
    while name in used:
      n += 1
      name = f'{stem}-{n}'
    used.add(name)
    out.append(os.path.join(workdir, 'captions', name + '.png'))
  return out


def caption(workdir: str, image_paths: list[str]) -> int:
  """--mode=caption: `path: caption` per image; attention models also write workdir/captions/<name>.png."""
  if not image_paths:
    raise UserError('--images is empty: pass --images=a.jpg,b.tif')
  io_utils.check_no_links(workdir, ('captions',))
  captioner = inference.Captioner(workdir)
  failures = 0
  for path, out in zip(image_paths, _attention_map_paths(workdir, image_paths)):
    try:
      words, alphas = captioner.caption(path)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      failures += 1
      continue
    print(f'{path}: {" ".join(words)}', flush=True)
    if alphas is not None:
      plots.plot_attention(path, words, alphas, out)
      print(f'  attention map: {out}', flush=True)
  return 2 if failures else 0  # a bad image is bad input: the same code as a UserError


# The metrics a baseline's line starts with, in this order; any others follow in name order.
_BASELINE_METRICS = (
  'test_cider',
  'test_bleu4',
  'test_bleu1',
  'test_bleu2',
  'test_bleu3',
  'test_rouge_l',
  'test_meteor',
  'test_bleu4_sentence_mean',
)


def _metric_line(name: str, scores: dict) -> str:
  """'name: metric=value ...', the numbers first, then any text fields (e.g. features) in parentheses."""
  numbers = {m: v for m, v in scores.items() if isinstance(v, (int, float))}
  order = [m for m in _BASELINE_METRICS if m in numbers] + sorted(set(numbers) - set(_BASELINE_METRICS))
  values = [f'{m}={numbers[m]:.4g}' if isinstance(numbers[m], float) else f'{m}={numbers[m]}' for m in order]
  notes = [f'{m}: {v}' for m, v in sorted(scores.items()) if m not in numbers]
  return f'{name}: {" ".join(values)}' + (f' ({"; ".join(notes)})' if notes else '')


def baselines(config: ml_collections.ConfigDict, workdir: str) -> int:
  """--mode=baselines: one line per captioning baseline (captioning.baselines); writes workdir/baselines.json.

  Also workdir/baselines/NAME per baseline with test captions, each comparable with a run (--mode=compare).
  """
  task = config.get('task')
  if task is None or not issubclass(tasks_lib.task_class(task), captioning_task.CaptioningTask):
    raise UserError(
      f'--mode=baselines needs a captioning config, not one with config.task={task!r}; '
      'use --config=configs/captioner.py (or another captioning config)'
    )
  results = captioning_task.run_baselines(config, workdir)
  for name, scores in results.scores.items():
    print(_metric_line(name, scores))
  for name, why in results.skipped.items():
    print(f'{name}: skipped ({why})')
  print(f'written: {os.path.join(workdir, captioning_task.BASELINES_FILE)}')
  folders = os.path.join(workdir, captioning_task.BASELINE_WORKDIRS)
  print(
    f'workdirs: {folders}/{{{",".join(results.captions)}}} (compare a run with one: launch.py --mode=compare '
    f'--workdir=RUN --compare_to={folders}/NAME)'
  )
  return 0


def run(mode: str, config, workdir: str | None, images: list[str], compare_to: str | None = None) -> int:
  """Dispatches one mode; returns the exit code (UserError propagates)."""
  if jax.process_count() > 1:  # every process must run the same command (apart from --process_id)
    fields = config_utils.flatten(config.to_dict()) if isinstance(config, ml_collections.ConfigDict) else {}
    parallel.check_same_everywhere(
      {'--mode': mode, '--workdir': workdir, **{f'config.{k}': v for k, v in fields.items()}}
    )
  if mode != 'train' and jax.process_count() > 1:
    raise UserError(f'--mode={mode} runs in one process; drop --num_processes / --distributed_auto')
  if mode == 'caption':
    return caption(config_utils.require_workdir(workdir, mode), images)
  if mode == 'report':
    print(report.write_report(config_utils.require_workdir(workdir, mode)))
    return 0
  if mode == 'compare':
    if not compare_to:
      raise UserError('--mode=compare needs --compare_to=<the other captioning workdir> beside --workdir')
    print(report.write_comparison(config_utils.require_workdir(workdir, mode), compare_to))
    return 0
  config = config_utils.require_config(config)
  parallel.same_verdict(lambda: config_utils.validate(config))
  if mode == 'train':
    return train(config, config_utils.require_workdir(workdir, mode))
  if mode == 'summary':
    return summary(config)
  if mode == 'baselines':
    return baselines(config, config_utils.require_workdir(workdir, mode))
  if mode == 'attention_check':
    return attention_check(config)
  if mode == 'equivariance_check':
    return equivariance_check(config)
  if mode == 'imagenet_predict':
    return imagenet_predict(config, images)
  raise app.UsageError(f'--mode={mode} is not handled')


def _stop_line(e: parallel.Preempted) -> tuple[int, str]:
  """Exit code and line for a stop on a signal: 130 after Ctrl-C, 0 after SIGTERM or SIGHUP."""
  if e.signal_name == 'SIGINT':
    if e.step is None:
      return 130, f'interrupted during {e.phase}; nothing new to save; restart the same command'
    return 130, f'interrupted at step {e.step}; checkpoint saved; restart the same command to resume'
  by = '' if e.signal_name in (None, 'SIGTERM') else f' ({e.signal_name})'
  if e.step is None:
    return 0, f'preempted during {e.phase}{by}; nothing new to save; restart the same command'
  return 0, f'preempted at step {e.step}{by}; restart the same command to resume'


def _exit(code: int, line: str) -> None:
  logging.flush()
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def main(
  mode: str,
  config,
  workdir: str | None,
  images: list[str],
  distributed: Distributed | None = None,
  compilation_cache: str | None = None,
  compare_to: str | None = None,
) -> None:
  """Joins the other processes (if any), runs a mode and exits with one line for anything but success.

  compilation_cache: the --compilation_cache_dir value (None: the default folder, empty: off).
  Exit codes: the mode's; 2 for a UserError; 0 after SIGTERM or SIGHUP (preempted; a checkpoint saved if
  training had started); 130 after Ctrl-C; 1 when another process of the run died.
  """
  cache_dir = compilation_cache_dir(compilation_cache)
  use_compilation_cache(cache_dir)  # before any compilation, joining the other processes' included
  distributed = distributed or Distributed()
  if distributed.process_id:
    logging.set_verbosity(logging.WARNING)  # process 0 tells the story; the others only warn
  try:
    d = distributed.resolved()

    def abandon(signal_name: str | None) -> None:  # from a watch thread: the main thread waits inside JAX
      if signal_name is None:
        code, line = (
          2,
          (
            f'error: the processes of this run did not all join {d.coordinator_address or "the cluster"} within '
            f'{d.timeout_s} s; start every process with the same --coordinator_address and --num_processes and '
            'its own --process_id (one started twice, or one never started, leaves the others waiting)'
          ),
        )
      else:
        code, line = _stop_line(parallel.Preempted(None, signal_name, 'the start (joining the other processes)'))
      logging.flush()
      print(line, file=sys.stderr, flush=True)
      os._exit(code)  # pylint: disable=protected-access  # the main thread cannot be woken from inside JAX

    parallel.initialize(d.coordinator_address, d.num_processes, d.process_id, d.auto, d.timeout_s, abandon)  # first
  except UserError as e:
    _exit(2, f'error: {e}')
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  if cache_dir:
    logging.info('compiled programs are kept in %s (--compilation_cache_dir, --nocompilation_cache)', cache_dir)
  try:
    with parallel.StopRequest(f'--mode={mode}'):  # training and sweeps name their own phases
      code = run(mode, config, workdir, images, compare_to)
  except UserError as e:
    _exit(2, f'error: {e}')
  except parallel.Preempted as e:
    _exit(*_stop_line(e))
  except KeyboardInterrupt:
    _exit(130, 'interrupted (Ctrl-C); nothing saved since the last checkpoint; restart the same command to resume')
  except OSError as e:
    message = errors.environment_error_message(e)  # a full disk, a read-only folder: not a bug
    if message is None:
      raise
    _exit(2, f'error: {message}')
  except Exception as e:
    line = parallel.peer_failure(e)
    if line is None:
      raise
    logging.flush()
    print(f'error: process {jax.process_index()}: {line}', file=sys.stderr, flush=True)
    os._exit(1)  # skips the exit barrier that the dead peer never reaches
  sys.exit(code)
