"""Training for every task: one generic jitted train step, data-parallel sharding, orbax checkpoints.

Resume order (what a restarted run does):
  1. restore the newest checkpoint in workdir/checkpoints if there is one ("resuming from step N"),
     else start fresh ("no checkpoint, starting fresh");
  2. the epoch and position in it follow from the step; each epoch's shuffle is seeded by (seed, epoch)
     and dropout keys are fold_in(key, step), so nothing random is checkpointed;
  3. running loss sums and the metrics history come from the checkpoint's metadata, and metrics.jsonl is
     rewritten from it, so files always agree with the checkpoint.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from cnn_caption.errors import UserError
from cnn_caption.io_utils import write_json, write_jsonl

Batch = dict[str, jax.Array]
TrainState = train_state.TrainState


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """optax optimizer from config.optimizer (sgd/adam/adamw, schedule, weight decay, clipping)."""
  lr = opt.learning_rate
  if opt.schedule == 'cosine':
    lr = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  elif opt.schedule == 'warmup_cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1))
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay and opt.name != 'adamw':
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  if opt.name == 'sgd':
    parts.append(optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov))
  elif opt.name == 'adam':
    parts.append(optax.adam(lr))
  elif opt.name == 'adamw':
    parts.append(optax.adamw(lr, weight_decay=opt.weight_decay))
  else:
    raise UserError(f"config.optimizer.name={opt.name!r} is unknown; use 'sgd', 'adam' or 'adamw'")
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def create_train_state(model, example_inputs: tuple, rng: jax.Array, tx) -> TrainState:
  """Initialises parameters from example inputs (batch of 1)."""
  variables = jax.jit(functools.partial(model.init, train=False))(rng, *example_inputs)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx)


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
  (lax.scan over steps measured several times slower on XLA:CPU, see ECOSYSTEM.md).
  """
  all_metrics = []
  for i in range(num_steps):
    state, metrics = train_step(state, jax.tree.map(lambda x: x[i], batches), rng, task=task)
    all_metrics.append(metrics)
  return state, jax.tree.map(lambda *xs: jnp.stack(xs), *all_metrics)


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over all devices (all hosts)."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def check_batch_size(batch_size: int, name: str = 'batch_size') -> None:
  n = jax.device_count()
  if batch_size % n:
    raise UserError(f'config.{name}={batch_size} is not divisible by the {n} devices; '
                    f'set --config.{name} to a multiple of {n}')


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0) -> Batch:
  """Global host batch -> arrays sharded along batch_axis over the mesh; each host feeds its rows."""
  spec = P(*([None] * batch_axis), 'data')
  sharding = NamedSharding(mesh, spec)
  pid, nproc = jax.process_index(), jax.process_count()

  def put(x):
    n = x.shape[batch_axis]
    rows = slice(pid * n // nproc, (pid + 1) * n // nproc)
    local = x[(slice(None),) * batch_axis + (rows,)]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


class Checkpointer:
  """orbax CheckpointManager holding the TrainState and a JSON metadata item."""

  def __init__(self, directory: str, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: dict) -> None:
    if step in self.manager.all_steps():
      # A run killed between the best-epoch save and the epoch save redoes that epoch; resumption is
      # exact, so the checkpoint already on disk holds the same values.
      logging.info('checkpoint for step %d already in %s; keeping it', step, self.manager.directory)
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'checkpoint {self.manager.directory}/{step} does not match this config '
                      f'({str(e).splitlines()[0][:200]}); use a fresh --workdir or the config it was '
                      'trained with') from None
    return restored['state'], restored['meta']

  def restore_params(self, step: int):
    """Only the parameters, as saved (no target needed: used to caption from a workdir alone)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored['state']['params']

  def close(self) -> None:
    self.manager.close()


class _DropLibraryInfo:
  """absl-handler filter: orbax logs several INFO lines per save; keep its warnings only."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains config's task in workdir (resuming if possible), evaluates, writes results.json."""
  if config.get('sweep') and config.sweep.get('learning_rates'):
    from cnn_caption import sweep  # pylint: disable=g-import-not-at-top
    return sweep.run_sweep(config, workdir)
  from cnn_caption import tasks  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  task = tasks.get_task(config, workdir)
  return Trainer(config, workdir, task).run()


class Trainer:
  """The generic epoch loop: batches -> jitted steps -> eval -> checkpoint; the task is all that varies."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, task):
    self.config, self.workdir, self.task = config, workdir, task
    quiet_library_logs()
    check_batch_size(config.batch_size)
    self.mesh = make_mesh()
    self.steps_per_epoch = task.num_train // config.batch_size
    if self.steps_per_epoch == 0:
      raise UserError(f'only {task.num_train} training examples for config.batch_size={config.batch_size}; '
                      'lower the batch size or add data')
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.metrics_path = os.path.join(workdir, 'metrics.jsonl')

  def _compile(self, num_steps: int) -> Callable:
    fn = functools.partial(train_steps, task=self.task, num_steps=num_steps)
    return jax.jit(fn, donate_argnums=0)

  def _host_batches(self, order: np.ndarray, start: int, num_steps: int) -> dict[str, np.ndarray]:
    b = self.config.batch_size
    idx = order[start * b:(start + num_steps) * b]
    batch = self.task.train_batch(idx)
    return {k: v.reshape(num_steps, b, *v.shape[1:]) for k, v in batch.items()}

  def run(self) -> dict:
    config, task = self.config, self.task
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    tx = make_optimizer(config.optimizer, self.total_steps)
    state = create_train_state(task.model, task.example_inputs(), init_rng, tx)
    state = replicate(state, self.mesh)
    dropout_rng = replicate(dropout_rng, self.mesh)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

    ckpt = Checkpointer(os.path.join(self.workdir, 'checkpoints'), config.checkpoint.max_to_keep)
    best_ckpt = Checkpointer(os.path.join(self.workdir, 'checkpoints_best'), 1)
    meta = {'history': [], 'epoch_loss_sum': 0.0, 'epoch_loss_count': 0, 'total_loss_sum': 0.0,
            'total_loss_count': 0, 'best_epoch': None, 'best_value': None}
    latest = ckpt.latest_step()
    if latest is not None:
      logging.info('resuming from step %d (%s)', latest, ckpt.manager.directory)
      state, meta = ckpt.restore(latest, state)
    else:
      logging.info('no checkpoint, starting fresh in %s', self.workdir)
    task.save_assets(self.workdir)
    write_jsonl(self.metrics_path, meta['history'])

    k = config.steps_per_call
    step_fns = {}
    step = int(state.step)
    epoch = step // self.steps_per_epoch
    while epoch < config.num_epochs and not self._should_stop(meta):
      order = _epoch_order(config.seed, epoch, task.num_train)
      pos = step - epoch * self.steps_per_epoch
      t_epoch = time.time()
      t_log, steps_at_log = time.time(), step
      pending = None  # the previous call's device metrics: read one call late so the host runs ahead
      while pos < self.steps_per_epoch:
        n = min(k, self.steps_per_epoch - pos)
        if n not in step_fns:
          step_fns[n] = self._compile(n)
        batch = shard_batch(self._host_batches(order, pos, n), self.mesh, batch_axis=1)
        state, metrics = step_fns[n](state, batch, dropout_rng)
        if pending is not None:
          self._account(meta, pending)
        pending = (metrics, step)
        pos += n
        step += n
        save_mid = config.checkpoint.every_steps and (step // config.checkpoint.every_steps
                                                       > (step - n) // config.checkpoint.every_steps)
        if save_mid and pos < self.steps_per_epoch:
          self._account(meta, pending)
          pending = None
          ckpt.save(step, state, meta)
        if step // config.log_every_steps > (step - n) // config.log_every_steps:
          dt = time.time() - t_log
          rate = (step - steps_at_log) / max(dt, 1e-9)
          logging.info('epoch %d step %d/%d  loss(running) %.4f  %.1f steps/s  %.0f samples/s',
                       epoch + 1, step, self.total_steps,
                       meta['total_loss_sum'] / max(meta['total_loss_count'], 1),
                       rate, rate * config.batch_size)
          t_log, steps_at_log = time.time(), step
      if pending is not None:
        self._account(meta, pending)
      train_seconds = time.time() - t_epoch
      val = task.evaluate(state.params, 'val')
      record = {'epoch': epoch + 1, 'step': step,
                'train_loss': meta['epoch_loss_sum'] / max(meta['epoch_loss_count'], 1),
                'train_loss_running': meta['total_loss_sum'] / max(meta['total_loss_count'], 1),
                'seconds': train_seconds, 'eval_seconds': time.time() - t_epoch - train_seconds}
      record.update({f'val_{name}': value for name, value in val.items()})
      meta['history'].append(record)
      meta['epoch_loss_sum'], meta['epoch_loss_count'] = 0.0, 0
      value = record[f'val_{task.selection_metric}']
      if meta['best_value'] is None or value > meta['best_value']:
        meta['best_epoch'], meta['best_value'] = epoch + 1, value
        best_ckpt.save(step, state, {'epoch': epoch + 1, 'value': value})
      logging.info('epoch %d: %s', epoch + 1,
                   '  '.join(f'{k2} {v:.4f}' for k2, v in record.items() if isinstance(v, float)))
      ckpt.save(step, state, meta)
      write_jsonl(self.metrics_path, meta['history'])
      epoch += 1
    if self._should_stop(meta):
      logging.info('early stopping after epoch %d: no val %s gain for %d epochs', len(meta['history']),
                   task.selection_metric, config.early_stopping_patience)

    results = self._finish(state, meta, best_ckpt, num_params)
    ckpt.close()
    best_ckpt.close()
    return results

  def _should_stop(self, meta: dict) -> bool:
    """Early stopping (also on resume): `early_stopping_patience` epochs without a val gain."""
    patience = self.config.get('early_stopping_patience')
    return bool(patience) and meta['best_epoch'] is not None and (
        len(meta['history']) - meta['best_epoch'] >= patience)

  def _account(self, meta: dict, pending) -> None:
    """Adds one call's losses to the running sums; stops at the first NaN/inf."""
    metrics, first_step = pending
    losses = np.asarray(metrics['loss'], np.float64)
    bad = ~np.isfinite(losses)
    if bad.any():
      at = first_step + int(np.argmax(bad)) + 1
      raise UserError(f'training loss became {losses[bad][0]} at step {at}; stopped without saving, so '
                      f'the last good checkpoint in {self.workdir}/checkpoints is untouched; lower '
                      '--config.optimizer.learning_rate or enable --config.optimizer.grad_clip_norm')
    meta['epoch_loss_sum'] += float(losses.sum())
    meta['epoch_loss_count'] += losses.size
    meta['total_loss_sum'] += float(losses.sum())
    meta['total_loss_count'] += losses.size

  def _finish(self, state: TrainState, meta: dict, best_ckpt: Checkpointer, num_params: int) -> dict:
    config, task = self.config, self.task
    history = meta['history']
    best_state = state
    if meta['best_epoch'] is not None and best_ckpt.latest_step() is not None:
      best_state, _ = best_ckpt.restore(best_ckpt.latest_step(), state)
    results = {
        'num_params': num_params,
        'epochs_trained': len(history),
        'best_epoch': meta['best_epoch'],
        f'best_val_{task.selection_metric}': meta['best_value'],
        f'val_{task.selection_metric}': history[-1][f'val_{task.selection_metric}'] if history else None,
        'train_loss': history[-1]['train_loss'] if history else None,
        'train_seconds': float(sum(r['seconds'] for r in history)),
        'devices': jax.device_count(),
        'config': config.to_dict(),
    }
    results.update(task.final_results(state.params, best_state.params, self.workdir))
    task.make_plots(history, state.params, self.workdir)
    write_json(os.path.join(self.workdir, 'results.json'), results)
    logging.info('results: %s', {k: v for k, v in results.items() if k != 'config'})
    return results
