"""The optax optimizer of config.optimizer."""

from __future__ import annotations

import ml_collections
import optax

from cnn_caption.errors import UserError


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.ScalarOrSchedule:
  """The learning rate as a constant or an optax schedule of the step."""
  lr = opt.learning_rate
  if opt.schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if opt.schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1))
  return lr


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """optax optimizer from config.optimizer (sgd/adam/adamw, schedule, weight decay, clipping)."""
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
  return optax.chain(*parts) if len(parts) > 1 else parts[0]
