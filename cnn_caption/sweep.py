"""Learning-rate sweep: one independent run per rate (side by side), best by validation.

Members run as separate processes that see every core, exactly as a run started alone does: XLA:CPU
picks its thread pool (and so the order of float reductions) from the visible cores, so pinning a
member to one core would change its numbers. Running them side by side only changes their speed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_lib
import signal
import time

from absl import logging
import ml_collections

from cnn_caption import config_utils
from cnn_caption import io_utils
from cnn_caption import plots
from cnn_caption import train
from cnn_caption.errors import UserError
from cnn_caption.training import parallel as parallel_lib
from cnn_caption.training import run_record
from cnn_caption.training import workdir_lock

POLL_S = 1.0  # how often the parent looks for members that died without reporting
STOP_GRACE_S = 20.0  # SIGTERM -> SIGKILL for the other members once one has failed


def run_dir(workdir: str, lr: float) -> str:
  return os.path.join(workdir, f'lr_{lr:g}')


def single_run_config(config: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
  """The sweep's member for one rate: exactly the config a user would run alone with that rate."""
  member = ml_collections.ConfigDict(config.to_dict())
  member.optimizer.learning_rate = lr
  member.sweep.learning_rates = ()
  return member


def _child(config_json: str, workdir: str, queue) -> None:
  """Runs one member in a fresh process; reports (workdir, error or None)."""
  try:
    train.train_and_evaluate(ml_collections.ConfigDict(json.loads(config_json)), workdir)
    queue.put((workdir, None))
  except parallel_lib.Preempted as e:
    queue.put((workdir, f'stopped by {e.signal_name} ({e})'))
  except Exception as e:  # any failure of a member is reported by the parent
    queue.put((workdir, f'{type(e).__name__}: {e}'))


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every config.sweep.learning_rates member (resuming each), picks the best by val accuracy."""
  config_utils.validate(config)
  rates = list(config.sweep.learning_rates)
  io_utils.prepare_workdir(
    workdir, ('plots', 'results.json', *(os.path.basename(run_dir(workdir, lr)) for lr in rates))
  )
  if len(set(rates)) != len(rates):
    raise UserError(f'config.sweep.learning_rates={rates} has duplicates; list each rate once')
  parallel = config.sweep.parallel or run_record.usable_cpus()
  todo = [lr for lr in rates if not os.path.exists(os.path.join(run_dir(workdir, lr), 'results.json'))]
  for lr in rates:
    if lr not in todo:
      logging.info('sweep: lr %g already finished in %s', lr, run_dir(workdir, lr))
  with workdir_lock.WorkdirLock(workdir):
    _run_members(config, workdir, todo, parallel)
    return _summarise(config, workdir, rates)


def _exit_reason(exitcode: int | None) -> str:
  """How a member process ended without reporting, in words."""
  if exitcode is not None and exitcode < 0:
    try:
      name = signal.Signals(-exitcode).name
    except ValueError:
      name = f'signal {-exitcode}'
    return f'was killed by {name}' + (' (as the out-of-memory killer does)' if name == 'SIGKILL' else '')
  return f'exited with code {exitcode} without reporting a result'


def _stop(running: dict[str, multiprocessing.Process], grace_s: float = STOP_GRACE_S) -> None:
  """SIGTERM to the members still running (they save a checkpoint and exit), SIGKILL after grace_s."""
  for proc in running.values():
    if proc.is_alive():
      proc.terminate()
  deadline = time.time() + grace_s
  for proc in running.values():
    proc.join(max(0.0, deadline - time.time()))
    if proc.is_alive():
      proc.kill()
      proc.join()


def _run_members(config: ml_collections.ConfigDict, workdir: str, todo: list[float], parallel: int) -> None:
  """Runs the members side by side; a member that fails or dies stops the sweep (UserError naming it)."""
  ctx = multiprocessing.get_context('spawn')  # fresh interpreters: jax is not fork-safe
  queue = ctx.Queue()
  running: dict[str, multiprocessing.Process] = {}
  errors = []
  try:
    _supervise(ctx, config, workdir, todo, parallel, queue, running, errors)
  except parallel_lib.Preempted as e:  # a signal to this process: the running members save, then all stop
    _stop(running)
    raise parallel_lib.Preempted(None, e.signal_name, 'the sweep (its running members saved a checkpoint)') from None
  if errors:
    raise UserError(
      'sweep member failed: '
      + ' | '.join(e.splitlines()[0] for e in errors)
      + '; rerun the same command to resume the unfinished members'
    )


def _supervise(ctx, config, workdir, todo, parallel, queue, running, errors) -> None:
  """Starts members as slots free up and collects their reports until all are done or one failed."""

  def handle(done_dir: str, error: str | None) -> None:
    running.pop(done_dir).join()
    if error:
      errors.append(f'{done_dir}: {error}')
      logging.error('sweep: %s failed: %s', done_dir, error)
    else:
      logging.info('sweep: %s finished', done_dir)

  while (todo and not errors) or running:
    while todo and not errors and len(running) < parallel:
      lr = todo.pop(0)
      member_dir = run_dir(workdir, lr)
      proc = ctx.Process(target=_child, args=(single_run_config(config, lr).to_json(), member_dir, queue))
      proc.start()
      running[member_dir] = proc
      logging.info('sweep: lr %g started in %s', lr, member_dir)
    try:
      handle(*queue.get(timeout=POLL_S))
    except queue_lib.Empty:
      # A member killed from outside (SIGKILL, the OOM killer) never reports: look for dead ones.
      dead = [d for d, p in running.items() if not p.is_alive()]
      while dead:
        try:  # a member that reported just before exiting: take its report first
          handle(*queue.get_nowait())
        except queue_lib.Empty:
          break
        dead = [d for d in dead if d in running]
      for member_dir in dead:
        handle(member_dir, f'the member process {_exit_reason(running[member_dir].exitcode)}')
    if errors and running:
      logging.error('sweep: stopping the other members (they save a checkpoint first)')
      _stop(running)
      running.clear()


def _summarise(config: ml_collections.ConfigDict, workdir: str, rates: list[float]) -> dict:
  """Best member by final validation accuracy, plots and results.json."""

  runs = []
  histories = {}
  for lr in rates:
    with open(os.path.join(run_dir(workdir, lr), 'results.json')) as f:
      r = json.load(f)
    with open(os.path.join(run_dir(workdir, lr), 'metrics.jsonl')) as f:
      histories[f'lr {lr:g}'] = [json.loads(line) for line in f]
    runs.append(
      {
        'learning_rate': lr,
        'val_accuracy': r['val_accuracy'],
        'test_accuracy': r['test_accuracy'],
        'best_val_accuracy': r['best_val_accuracy'],
        'train_loss': r['train_loss'],
        'train_seconds': r['train_seconds'],
        'workdir': run_dir(workdir, lr),
      }
    )
  best = max(runs, key=lambda r: r['val_accuracy'])  # chosen on validation only
  results = {'runs': runs, 'best': best, 'selection': 'final validation accuracy', 'config': config.to_dict()}
  plot_dir = os.path.join(workdir, 'plots')
  plots.plot_curves(
    {k: [r['train_loss'] for r in h] for k, h in histories.items()},
    'training loss (epoch mean)',
    os.path.join(plot_dir, 'train_loss.png'),
  )
  plots.plot_curves(
    {k: [r['val_accuracy'] for r in h] for k, h in histories.items()},
    'validation accuracy',
    os.path.join(plot_dir, 'val_accuracy.png'),
  )
  io_utils.write_json(os.path.join(workdir, 'results.json'), results)
  train.write_report(workdir)
  logging.info(
    'sweep: best lr %g (val %.4f, test %.4f)', best['learning_rate'], best['val_accuracy'], best['test_accuracy']
  )
  return results
