"""flax's TrainState plus an optional exponential moving average (EMA) of the parameters."""

from __future__ import annotations

from typing import Any

from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp


def ema_decay_at(decay: float, num_updates: jax.Array) -> jax.Array:
  """The decay used after num_updates optimizer updates: min(decay, (1 + n) / (10 + n)), a short warm-up."""
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


class TrainState(train_state.TrainState):
  """TrainState whose `ema_params` (None when off) follow the parameters after each optimizer update.

  With gradient accumulation over k micro-batches the parameters change every k-th step only, and so
  does the average (`ema_every` = k).
  """

  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)
  ema_every: int = struct.field(pytree_node=False, default=1)

  @classmethod
  def create(cls, *, apply_fn, params, tx, ema_decay: float = 0.0, ema_every: int = 1, **kwargs):
    ema_params = jax.tree.map(jnp.copy, params) if ema_decay else None
    return super().create(
      apply_fn=apply_fn, params=params, tx=tx, ema_params=ema_params, ema_decay=ema_decay, ema_every=ema_every, **kwargs
    )

  def apply_gradients(self, *, grads, **kwargs):
    new = super().apply_gradients(grads=grads, **kwargs)
    if self.ema_params is None:
      return new
    updates = new.step // self.ema_every
    decay = jnp.where(new.step % self.ema_every == 0, ema_decay_at(self.ema_decay, updates - 1), 1.0)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, new.params)
    return new.replace(ema_params=ema)
