"""The optax optimizer of config.optimizer."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import optax

from cnn_caption.errors import UserError


def accumulate_steps(opt: ml_collections.ConfigDict) -> int:
  """Micro-batches per optimizer update (config.optimizer.accumulate_steps; 1 = no accumulation)."""
  return int(opt.get('accumulate_steps', 1) or 1)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.ScalarOrSchedule:
  """The learning rate as a constant or an optax schedule of the update count (steps / accumulate_steps)."""
  lr = opt.learning_rate
  updates = max(total_steps // accumulate_steps(opt), 1)
  if opt.schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, updates)
  if opt.schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, max(updates, opt.warmup_steps + 1))
  if opt.schedule == 'one_cycle':
    # Cosine rise from lr/25 to lr over warmup_fraction of the updates, then cosine fall to lr/25/1e4 (Smith's
    # one cycle as optax.cosine_onecycle_schedule draws it).
    return optax.cosine_onecycle_schedule(
      updates, lr, pct_start=opt.get('warmup_fraction', 0.3), div_factor=25.0, final_div_factor=1e4
    )
  return lr


def learning_rate_at(opt: ml_collections.ConfigDict, total_steps: int) -> Callable[[int], float]:
  """Train step -> the learning rate in force there (host side, for logging)."""
  schedule, k = learning_rate_schedule(opt, total_steps), accumulate_steps(opt)
  return lambda step: float(schedule(step // k) if callable(schedule) else schedule)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """optax optimizer from config.optimizer (sgd/adam/adamw, schedule, weight decay, clipping, accumulation)."""
  lr = learning_rate_schedule(opt, total_steps)
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
  tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
  k = accumulate_steps(opt)
  # Averages the gradients of k micro-batches, then applies one update (zero updates in between).
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx
