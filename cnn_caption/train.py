"""Training for every task: one generic jitted train step and the epoch loop (the Trainer).

Resume order (what a restarted run does):
  1. restore the newest checkpoint in workdir/checkpoints if there is one ("resuming from step N"),
     else start fresh ("no checkpoint, starting fresh");
  2. the epoch and position in it follow from the step; each epoch's shuffle is seeded by (seed, epoch)
     and dropout keys are fold_in(key, step), so nothing random is checkpointed;
  3. running loss sums and the metrics history come from the checkpoint's metadata (RunMeta), and
     metrics.jsonl is rewritten from it, so files always agree with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from cnn_caption import config_utils
from cnn_caption import io_utils
from cnn_caption import report
from cnn_caption import tasks as tasks_lib
from cnn_caption.errors import UserError
from cnn_caption.io_utils import write_json
from cnn_caption.io_utils import write_jsonl
from cnn_caption.training import checkpoint as checkpoint_lib
from cnn_caption.training import ema
from cnn_caption.training import monitor as monitor_lib
from cnn_caption.training import optim
from cnn_caption.training import parallel
from cnn_caption.training import profiling
from cnn_caption.training import run_record
from cnn_caption.training import workdir_lock

Batch = dict[str, jax.Array]
TrainState = ema.TrainState  # flax's, plus an optional moving average of the parameters


# XLA:CPU spends seconds in LLVM's default (level 3) optimisation of the random initialisers, for a program run
# once: 4.3 s against 1.2 s for the homework CNN, 18.3 s against 2.6 s for the ResNet, with bit-identical
# parameters for every trained config (docs/benchmarks.md). Level 0 would change the parameters' last bits.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def create_train_state(
  model, example_inputs: tuple, rng: jax.Array, tx, ema_decay: float = 0.0, ema_every: int = 1
) -> TrainState:
  """Initialises parameters from example inputs (batch of 1); ema_decay > 0 adds their moving average.

  The initialiser runs once, so it is compiled with LLVM's level-1 optimisation (INIT_COMPILER_OPTIONS): the
  same parameters, bit for bit (tests/test_train.py), in a fraction of the compile time.
  """
  init = jax.jit(functools.partial(model.init, train=False), compiler_options=INIT_COMPILER_OPTIONS)
  variables = init(rng, *example_inputs)
  return TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=tx, ema_decay=ema_decay, ema_every=ema_every
  )


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, task) -> tuple[TrainState, dict]:
  """One optimizer step; generic over tasks (the task supplies loss and metrics)."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    return task.loss(params, batch, apply_fn=state.apply_fn, rngs={'dropout': rng}, train=True)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), task.metrics(loss, aux, grads)


def train_steps(state: TrainState, batches: Batch, rng: jax.Array, *, task, num_steps: int):
  """num_steps train_steps unrolled in one call (batches have a leading num_steps axis).

  At small batch sizes a step costs mostly dispatch overhead on CPU; unrolling amortises it
  (lax.scan over steps measured several times slower on XLA:CPU, jax 0.10.2).
  """
  all_metrics = []
  for i in range(num_steps):
    state, metrics = train_step(state, jax.tree.map(lambda x: x[i], batches), rng, task=task)  # noqa: B023 (used at once)
    all_metrics.append(metrics)
  return state, jax.tree.map(lambda *xs: jnp.stack(xs), *all_metrics)


# No healthy weight of these models comes near this; past it the run has diverged (finite but useless).
MAX_PARAM_ABS = 1e6


@jax.jit
def _max_abs(params) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(jnp.abs(p.astype(jnp.float32))) for p in jax.tree.leaves(params)]))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The training examples' order in one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass
class RunMeta:
  """What a checkpoint carries besides the TrainState (saved as JSON)."""

  history: list[dict] = dataclasses.field(default_factory=list)  # one record per finished epoch
  epoch_loss_sum: float = 0.0  # sum of loss * weight over the steps of the current epoch so far
  epoch_loss_count: float = 0  # sum of the weights (steps, or the task's loss_weight such as tokens)
  total_loss_sum: float = 0.0  # the same over every step so far (the homework's running loss)
  total_loss_count: float = 0
  best_epoch: int | None = None  # by validation task.selection_metric
  best_value: float | None = None
  config: dict | None = None  # the run's config, to refuse a resume that would change the computation
  devices: int | None = None  # jax.device_count() of the run that saved it (None: saved before this field)
  processes: int | None = None  # jax.process_count() of that run
  cpu_threads: int | None = None  # XLA:CPU's thread-pool size of that run (run_record.cpu_threads; None: not on CPU)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> RunMeta:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _cpu_threads() -> int | None:
  """XLA:CPU's thread-pool size (run_record.cpu_threads) when running on CPU; None on an accelerator."""
  return run_record.cpu_threads() if jax.default_backend() == 'cpu' else None


def _warn_if_rounding_changes(saved_threads: int | None) -> None:
  """A warning when the run resumes on CPU with another XLA:CPU thread-pool size than the checkpoint's run had.

  The pool size changes how XLA:CPU rounds a step (docs/usage.md): the run goes on, but no longer bit for bit.
  """
  now = _cpu_threads()
  if saved_threads is not None and now is not None and now != saved_threads:
    logging.warning(
      'resuming with an XLA:CPU thread pool of %d where the checkpoint was saved with %d: the floats from here on '
      'will not match an uninterrupted run bit for bit (NPROC=%d gives the saved size; docs/usage.md)',
      now,
      saved_threads,
      saved_threads,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> dict:
  """Trains config's task in workdir (resuming if possible), evaluates, writes results.json.

  Validates config exactly as the command line does. Returns the results dict (also in results.json).
  Raises parallel.Preempted on SIGTERM, SIGHUP or SIGINT (after saving, when training had started).
  """
  with parallel.StopRequest(SETUP) as stop:
    try:
      results = _train_and_evaluate(config, workdir, mesh, stop)
    except Exception as e:
      if stop.signum is not None and parallel.peer_failure(e):
        # Another process left on the same signal before this one reached the point they would have agreed on.
        raise parallel.Preempted(None, stop.signal_name, stop.phase) from None
      raise
    parallel.barrier('finished')  # process 0 writes results and plots last: no process exits before it
    return results


SETUP = 'setup (config, data, features, restoring the checkpoint)'
FINAL_EVALUATION = 'the final evaluation'


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None, stop) -> dict:
  fields = config_utils.flatten(config.to_dict())
  parallel.check_same_everywhere({'workdir': workdir, **{f'config.{k}': v for k, v in fields.items()}})
  parallel.same_verdict(lambda: config_utils.validate(config))
  if config.get('sweep') and config.sweep.get('learning_rates'):
    raise UserError(
      'config.sweep.learning_rates is set: a sweep is several runs; start it with launch.py '
      '(--mode=train) or cnn_caption.sweep.run_sweep(config, workdir)'
    )
  # Process 0 creates and probes the workdir; the others must then see it (check_shared_workdir).
  parallel.same_verdict(lambda: io_utils.prepare_workdir(workdir) if parallel.is_main_process() else None)
  # Every check below gives one verdict on every process, so none goes on alone into a collective.
  parallel.check_shared_workdir(workdir)
  checkpoint_lib.quiet_library_logs()
  # One run per workdir; process 0 holds the lock for a multi-process run.
  with workdir_lock.WorkdirLock(workdir) if parallel.is_main_process() else contextlib.nullcontext():
    if parallel.is_main_process():
      for path in io_utils.remove_stale_temporaries(workdir):
        logging.warning('removed %s, left by an interrupted save', path)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    task = parallel.same_verdict(lambda: tasks_lib.get_task(config, workdir, mesh))
    if stop.agreed():
      raise parallel.Preempted(None, stop.signal_name, SETUP)
    return parallel.same_verdict(lambda: Trainer(config, workdir, task, mesh)).run(stop)


class Trainer:
  """The generic epoch loop: batches -> jitted steps -> eval -> checkpoint; the task is all that varies."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, task: tasks_lib.Task, mesh: Mesh):
    self.config, self.workdir, self.task, self.mesh = config, workdir, task, mesh
    parallel.check_batch_size(config.batch_size)
    self.steps_per_epoch = task.num_train // config.batch_size
    if self.steps_per_epoch == 0:
      raise UserError(
        f'only {task.num_train} training examples for config.batch_size={config.batch_size}; '
        'lower the batch size or add data'
      )
    self.total_steps = self.steps_per_epoch * config.num_epochs
    profiling.check_window_in_run(config.get('profile_steps', ()), self.total_steps)
    window = profiling.check_profile_steps(config.get('profile_steps', ()))
    if window is not None and window[1] > self.total_steps:
      raise UserError(
        f'config.profile_steps={tuple(config.profile_steps)} reaches past the end of the run ({self.total_steps} '
        f'steps: {config.num_epochs} epochs of {self.steps_per_epoch}); choose a window within [0, {self.total_steps}]'
      )
    # A call never spans two epochs: more steps per call than an epoch has would only be cut to the epoch.
    self.steps_per_call = min(config.steps_per_call, self.steps_per_epoch)
    if self.steps_per_call < config.steps_per_call:
      logging.info(
        'config.steps_per_call=%d is more than the %d steps of an epoch; using %d',
        config.steps_per_call,
        self.steps_per_epoch,
        self.steps_per_call,
      )
    self._log_eval_cadence()
    self.metrics_path = os.path.join(workdir, 'metrics.jsonl')
    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.max_to_keep)
    self.best_ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints_best'), 1)
    self._step_fns: dict[int, Callable] = {}
    self.monitor: monitor_lib.RunMonitor | None = None
    self._eval_seconds = 0.0  # spent in validation within the current epoch

  def _mid_epoch_eval_steps(self):
    """The steps after which eval_every_steps validates within epochs, from the calls _train_epoch makes."""
    every, per_call, per_epoch = self.config.eval_every_steps, self.steps_per_call, self.steps_per_epoch
    for epoch in range(self.config.num_epochs):
      pos = 0
      while pos < per_epoch:
        n = min(per_call, per_epoch - pos)
        pos += n
        step = epoch * per_epoch + pos
        if step // every > (step - n) // every and pos < per_epoch:
          yield step

  def _log_eval_cadence(self) -> None:
    """One line when eval_every_steps does not fall on call boundaries: validation waits for a call's end."""
    every, per_call = self.config.get('eval_every_steps', 0), self.steps_per_call
    if not every or (every % per_call == 0 and self.steps_per_epoch % per_call == 0):
      return
    shown, rounded = [], False
    for step in self._mid_epoch_eval_steps():
      if len(shown) == 4 and rounded:
        shown.append('...')
        break
      rounded = rounded or step % every != 0
      if len(shown) < 4:
        shown.append(str(step))
    if rounded:
      logging.info(
        'config.eval_every_steps=%d: validation runs at the end of the call (config.steps_per_call=%d) that '
        'passes each multiple of %d, after steps %s, and at every epoch end',
        every,
        per_call,
        every,
        ', '.join(shown),
      )

  def run(self, stop: parallel.StopRequest | None = None) -> dict:
    """Restore, train the remaining epochs, then test and write results.

    `stop` (entered by train_and_evaluate) turns signals into parallel.Preempted: in the epoch loop after
    a checkpoint at an agreed step, elsewhere with nothing new to save.
    """
    with contextlib.ExitStack() as stack:
      if stop is None:
        stop = stack.enter_context(parallel.StopRequest(SETUP))
      return self._run(stop)

  def _run(self, stop: parallel.StopRequest) -> dict:
    try:
      state, meta, dropout_rng, num_params = self._restore()
      if stop.agreed():
        raise parallel.Preempted(None, stop.signal_name, SETUP)
      epoch = int(state.step) // self.steps_per_epoch
      stop.phase = parallel.TRAINING
      while epoch < self.config.num_epochs and not self._should_stop(meta):
        state, seconds = self._train_epoch(state, meta, dropout_rng, epoch, stop)
        with self.monitor.paused(state):
          self._end_of_epoch(state, meta, epoch, seconds)
        if stop.stopping:  # the signal came in the epoch's last call: saved with the epoch above
          raise parallel.Preempted(int(state.step), stop.signal_name)
        epoch += 1
      # A signal in the last epoch's end (validation, saves) or after the last call: the newest checkpoint
      # is at this step (the loop saved it, or it was restored), so stop here rather than evaluate.
      if stop.agreed():
        raise parallel.Preempted(int(state.step), stop.signal_name)
      stop.phase = FINAL_EVALUATION
      if self._should_stop(meta):
        logging.info(
          'early stopping after epoch %d: no val %s gain for %d epochs',
          len(meta.history),
          self.task.selection_metric,
          self.config.early_stopping_patience,
        )
      results = self._finish(state, meta, num_params)
      if stop.agreed():  # several processes finish the evaluation they are in together before stopping
        logging.warning('%s came during %s, which finished first; results written', stop.signal_name, stop.phase)
      return results
    finally:
      if self.monitor is not None:
        self.monitor.close()
      self.ckpt.close()
      self.best_ckpt.close()

  def _restore(self) -> tuple[TrainState, RunMeta, jax.Array, int]:
    """The initial state, or the newest checkpoint's; also the dropout key and the parameter count."""
    config, task = self.config, self.task
    restore_step = config.checkpoint.get('restore_step')
    steps = self.ckpt.all_steps()
    checked = None  # the step whose config was compared before building anything
    if steps:
      try:  # compare configs before building anything: a changed model fails here, in one line
        self._check_resume_config(self.ckpt.read_meta(restore_step or steps[-1]), restore_step or steps[-1])
        checked = restore_step or steps[-1]
      except Exception as e:  # pylint: disable=broad-except
        if not checkpoint_lib.is_damage(e):
          raise
        # a damaged newest checkpoint: restore_intact reports it and falls back
    run_record.record_config(config, self.workdir)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    tx = optim.make_optimizer(config.optimizer, self.total_steps)
    state = create_train_state(
      task.model,
      task.example_inputs(),
      init_rng,
      tx,
      config.get('ema_decay', 0.0),
      optim.accumulate_steps(config.optimizer),
    )
    state = parallel.replicate(state, self.mesh)
    dropout_rng = parallel.replicate(dropout_rng, self.mesh)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    task.check_memory(state.params)  # a too-large eval batch stops here, before any training
    meta = RunMeta(config=config.to_dict())
    found = self.ckpt.restore_intact(state, restore_step)
    if found is not None:
      step, state, saved = found
      if step != checked:  # fell back past a damaged checkpoint: compare with the one restored
        self._check_resume_config(saved, step)
      meta = RunMeta.from_json(saved)
      saved_on = meta.devices or jax.device_count()
      logging.info(
        'resuming from step %d, saved on %d device%s, now %d (%s)',
        step,
        saved_on,
        '' if saved_on == 1 else 's',
        jax.device_count(),
        self.ckpt.directory,
      )
      _warn_if_rounding_changes(meta.cpu_threads)
      newer = [s for s in self.ckpt.all_steps() if s > step]
      if newer:
        logging.warning(
          'restore_step=%d: newer steps %s moved to %s', step, newer, self.ckpt.set_aside(newer, 'superseded')
        )
      best = self.best_ckpt.latest_step()
      if best is not None and best > step:
        self.best_ckpt.set_aside([best], 'superseded')
      meta.config = config.to_dict()
    elif config.get('init_from'):
      state = state.replace(params=self._init_params(state.params, config.init_from))
      if state.ema_params is not None:
        state = state.replace(ema_params=state.params)
      logging.info('no checkpoint, starting from the best parameters of %s', config.init_from)
    else:
      initial = task.initial_params(state.params)  # pretrained parts of a fresh model, if the task has any
      if initial is not state.params:
        state = state.replace(params=parallel.replicate(initial, self.mesh))
        if state.ema_params is not None:
          state = state.replace(ema_params=state.params)
      logging.info('no checkpoint, starting fresh in %s', self.workdir)
    meta.devices, meta.processes = jax.device_count(), jax.process_count()
    meta.cpu_threads = _cpu_threads()
    if parallel.is_main_process():
      task.save_assets(self.workdir)
      write_jsonl(self.metrics_path, meta.history)
    self.monitor = monitor_lib.RunMonitor(
      config,
      self.workdir,
      start_step=int(state.step),
      total_steps=self.total_steps,
      steps_per_epoch=self.steps_per_epoch,
      learning_rate_fn=optim.learning_rate_at(config.optimizer, self.total_steps),
    )
    return state, meta, dropout_rng, num_params

  def _init_params(self, params, init_from: str):
    """Parameters of another workdir (its best epoch, else its newest step), checked against this model."""
    found = checkpoint_lib.best_params(init_from)
    if found is None:
      raise UserError(f'config.init_from={init_from} holds no checkpoint: point it at a finished training workdir')
    directory, step, loaded = found
    want = jax.tree.map(lambda p: (tuple(p.shape), str(p.dtype)), params)
    got = jax.tree.map(lambda p: (tuple(p.shape), str(p.dtype)), loaded)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise UserError(
        f'the parameters in {directory}/{step} do not fit this model (other sizes or layers); '
        'config.init_from must be trained with the same model settings'
      )
    logging.info('init_from: parameters of %s/%d', directory, step)
    return parallel.replicate(loaded, self.mesh)

  def _check_resume_config(self, saved: dict, step: int) -> None:
    """UserError listing the fields that differ from the checkpoint's config in a way that changes the numbers."""
    if not saved.get('config'):
      return  # written before configs were saved in checkpoints
    diffs = config_utils.computation_differences(saved['config'], self.config.to_dict())
    if not diffs:
      return
    if self.config.checkpoint.get('allow_config_change'):
      logging.warning('resuming step %d with a changed config (allowed): %s', step, '; '.join(diffs))
      return
    raise UserError(
      f'{self.ckpt.directory}/{step} was trained with another config: {"; ".join(diffs)}; '
      'resume with the same values, use a fresh --workdir, or pass '
      '--config.checkpoint.allow_config_change=True'
    )

  def _check_saveable(self, state: TrainState, step: int) -> None:
    """Refuses to checkpoint parameters that blew up, so a resume never starts from them."""
    largest = float(_max_abs(state.params))
    if not np.isfinite(largest) or largest > MAX_PARAM_ABS:
      raise UserError(
        f'the parameters blew up by step {step} (largest |w| = {largest:.3g}); stopped without '
        f'saving, so the last good checkpoint in {self.ckpt.directory} is untouched; lower '
        '--config.optimizer.learning_rate or enable --config.optimizer.grad_clip_norm'
      )

  def _compile(self, num_steps: int) -> Callable:
    if num_steps not in self._step_fns:
      fn = functools.partial(train_steps, task=self.task, num_steps=num_steps)
      options = config_utils.compiler_options(self.config)  # config.xla_options: this path only, not evaluation
      self._step_fns[num_steps] = jax.jit(fn, donate_argnums=0, compiler_options=options)
    return self._step_fns[num_steps]

  def _host_batches(self, order: np.ndarray, start: int, num_steps: int, step: int, params) -> dict[str, np.ndarray]:
    """This process's rows of the next num_steps global batches: it reads and preprocesses only those.

    An on-policy task (task.on_policy, e.g. SCST) builds its batch from the current parameters.
    """
    b = self.config.batch_size
    idx_SxB = order[start * b : (start + num_steps) * b].reshape(num_steps, b)[:, parallel.local_rows(self.mesh, b)]
    batch = self.task.train_batch(idx_SxB.reshape(-1), step, params)
    return {k: v.reshape(*idx_SxB.shape, *v.shape[1:]) for k, v in batch.items()}

  def _train_epoch(
    self, state: TrainState, meta: RunMeta, dropout_rng: jax.Array, epoch: int, stop: parallel.StopRequest
  ) -> tuple[TrainState, float]:
    """Trains from the state's step to the end of `epoch`; returns the state and the seconds taken.

    On SIGTERM / SIGINT (agreed by every process: stop.reached) it saves a checkpoint at the current step
    and raises parallel.Preempted; at the epoch's last step the epoch ends (and saves) first.
    """
    config = self.config
    order = epoch_order(config.seed, epoch, self.task.num_train)
    step = int(state.step)
    pos = step - epoch * self.steps_per_epoch
    t_epoch = time.time()
    self._eval_seconds = 0.0
    pending = None  # the previous call's device metrics: read one call late so the host runs ahead
    while pos < self.steps_per_epoch:
      n = min(self.steps_per_call, self.steps_per_epoch - pos)
      batch = parallel.shard_local_batch(
        self._host_batches(order, pos, n, step, state.params), self.mesh, config.batch_size, 1
      )
      self.monitor.before_call(step, n)
      state, metrics = self._compile(n)(state, batch, dropout_rng)
      self.monitor.after_call(step + n, state)
      if pending is not None:
        self._account(meta, pending)
      pending = (metrics, step)
      pos += n
      step += n
      if stop.reached(step) and pos < self.steps_per_epoch:
        self._account(meta, pending)
        self._check_saveable(state, step)
        self.ckpt.save(step, state, meta.to_json())
        raise parallel.Preempted(step, stop.signal_name)
      every = config.checkpoint.every_steps
      if every and step // every > (step - n) // every and pos < self.steps_per_epoch:
        self._account(meta, pending)
        pending = None
        with self.monitor.paused(state):
          self._check_saveable(state, step)
          self.ckpt.save(step, state, meta.to_json())
      every = config.get('eval_every_steps', 0)
      if every and step // every > (step - n) // every and pos < self.steps_per_epoch:
        with self.monitor.paused(state):
          self._validate(state)  # the epoch's end validates anyway
    if pending is not None:
      self._account(meta, pending)
    return state, time.time() - t_epoch - self._eval_seconds

  def _end_of_epoch(self, state: TrainState, meta: RunMeta, epoch: int, train_seconds: float) -> None:
    """Validation, the epoch's record, the best-epoch checkpoint, the epoch checkpoint."""
    task, step = self.task, int(state.step)
    t_eval = time.time()
    val = self._validate(state)
    record = {
      'epoch': epoch + 1,
      'step': step,
      'train_loss': meta.epoch_loss_sum / max(meta.epoch_loss_count, 1),
      'train_loss_running': meta.total_loss_sum / max(meta.total_loss_count, 1),
      'seconds': train_seconds,
      'eval_seconds': time.time() - t_eval,
    }
    for prefix, metrics in val.items():  # val_* and, with an EMA, val_ema_*
      record.update({f'{prefix}_{name}': value for name, value in metrics.items()})
    meta.history.append(record)
    meta.epoch_loss_sum, meta.epoch_loss_count = 0.0, 0
    self._check_saveable(state, step)
    self.monitor.images(step, task.tensorboard_images(state.params))
    value = record[self._selection_key]
    if meta.best_value is None or value > meta.best_value:
      meta.best_epoch, meta.best_value = epoch + 1, value
      self.best_ckpt.save(step, state, {'epoch': epoch + 1, 'value': value})
    logging.info(
      'epoch %d: %s', epoch + 1, '  '.join(f'{k} {v:.4f}' for k, v in record.items() if isinstance(v, float))
    )
    self.ckpt.save(step, state, meta.to_json())
    if parallel.is_main_process():
      write_jsonl(self.metrics_path, meta.history)

  @property
  def _test_ema(self) -> bool:
    """config.test_params == 'ema': the EMA picks the best epoch and is tested."""
    return self.config.get('test_params', 'raw') == 'ema'

  @property
  def _selection_key(self) -> str:
    return f'val_{"ema_" if self._test_ema else ""}{self.task.selection_metric}'

  def _validate(self, state: TrainState) -> dict[str, dict[str, float]]:
    """Validation of the parameters (and of their EMA), reported to TensorBoard and eval.jsonl."""
    t_eval, step = time.time(), int(state.step)
    results = {'val': self.task.evaluate(state.params, 'val')}
    if state.ema_params is not None:
      results['val_ema'] = self.task.evaluate(state.ema_params, 'val')
    self.monitor.evaluation(step, step / self.steps_per_epoch, results)
    self._eval_seconds += time.time() - t_eval
    return results

  def _should_stop(self, meta: RunMeta) -> bool:
    """Early stopping (also on resume): `early_stopping_patience` epochs without a val gain."""
    patience = self.config.get('early_stopping_patience')
    return bool(patience) and meta.best_epoch is not None and (len(meta.history) - meta.best_epoch >= patience)

  def _account(self, meta: RunMeta, pending) -> None:
    """Adds one call's losses to the running sums; stops at the first NaN/inf."""
    metrics, first_step = pending
    metrics = jax.tree.map(np.asarray, metrics)
    losses = np.asarray(metrics['loss'], np.float64)
    bad = ~np.isfinite(losses)
    if bad.any():
      at = first_step + int(np.argmax(bad)) + 1
      raise UserError(
        f'training loss became {losses[bad][0]} at step {at}; stopped without saving, so '
        f'the last good checkpoint in {self.workdir}/checkpoints is untouched; lower '
        '--config.optimizer.learning_rate or enable --config.optimizer.grad_clip_norm'
      )
    loss_sum, weight_sum = monitor_lib.weighted_loss_sums(metrics)  # weighted by the task's loss_weight
    meta.epoch_loss_sum += loss_sum
    meta.epoch_loss_count += weight_sum
    meta.total_loss_sum += loss_sum
    meta.total_loss_count += weight_sum
    self.monitor.train_metrics(first_step, metrics)

  def _finish(self, state: TrainState, meta: RunMeta, num_params: int) -> dict:
    """Test figures of the last and best epochs, plots, results.json."""
    config, task, history = self.config, self.task, meta.history
    best_state = state
    if meta.best_epoch is not None and self.best_ckpt.latest_step() is not None:
      best_state, _ = self.best_ckpt.restore(self.best_ckpt.latest_step(), state)
    metric = task.selection_metric
    results = {
      'num_params': num_params,
      'epochs_trained': len(history),
      'best_epoch': meta.best_epoch,
      f'best_val_{metric}': meta.best_value,
      f'val_{metric}': history[-1][self._selection_key] if history else None,
      'test_params': 'ema' if self._test_ema else 'raw',
      'train_loss': history[-1]['train_loss'] if history else None,
      'train_seconds': float(sum(r['seconds'] for r in history)),
      'devices': jax.device_count(),
      'config': config.to_dict(),
      'environment': run_record.environment(),
    }
    if self._test_ema:
      results.update(task.final_results(state.ema_params, best_state.ema_params, self.workdir))
    else:
      results.update(task.final_results(state.params, best_state.params, self.workdir))
    if parallel.is_main_process():
      task.make_plots(history, state.params, self.workdir)
      write_json(os.path.join(self.workdir, 'results.json'), results)
      write_report(self.workdir)
    logging.info('results: %s', {k: v for k, v in results.items() if k != 'config'})
    return results


def write_report(workdir: str) -> None:
  """workdir/report.html; the run's results are already saved, so a failure here only logs a warning."""
  try:
    logging.info('report: %s', report.write_report(workdir))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('report: not written (%s: %s); retry with launch.py --mode=report', type(e).__name__, e)
