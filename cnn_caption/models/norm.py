"""Batch normalisation whose evaluation statistics are recomputed from the parameters (PreciseBN).

Training normalises each batch by its own mean and variance, so the generic train step stays a pure function
of (parameters, batch): no running averages in the train state. Evaluation normalises by population
statistics that the task computes with the current parameters over a fixed set of training batches
(`population_stats`), the "precise" statistics of Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm",
section 3). They follow from the parameters alone: checkpoints hold nothing extra, and a resumed run evaluates
exactly as one that was never stopped.

In training mode each BatchNorm sows its batch moments into the MOMENTS collection. `sow` stores only
when that collection is mutable, so the train step, which does not ask for it, keeps nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MOMENTS = 'bn_moments'  # collection of (batch mean, batch mean of squares) per BatchNorm, training mode only
STATS = 'batch_stats'  # collection of the evaluation statistics: {'mean', 'var'} per BatchNorm


class BatchNorm(nn.Module):
  """Normalises over every axis but the last: batch statistics in training, STATS in evaluation."""

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale_C = self.param('scale', nn.initializers.ones_init(), (c,))
    bias_C = self.param('bias', nn.initializers.zeros_init(), (c,))
    if train:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean_C, var_C = x32.mean(axes), x32.var(axes)
      self.sow(MOMENTS, 'moments', (mean_C, var_C + jnp.square(mean_C)))
    else:  # read only in evaluation: training applies the parameters alone
      mean_C = self.variable(STATS, 'mean', lambda: jnp.zeros((c,), jnp.float32)).value
      var_C = self.variable(STATS, 'var', lambda: jnp.ones((c,), jnp.float32)).value
    mul_C = scale_C * jax.lax.rsqrt(var_C + self.epsilon)
    return ((x - mean_C) * mul_C + bias_C).astype(x.dtype)


def has_batch_norm(model: nn.Module, example_inputs: tuple) -> bool:
  """Whether the model has a BatchNorm (an STATS collection), from shapes only."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs, train=False))
  return STATS in shapes


def _to_stats(tree: dict) -> dict:
  """{'moments': ((mean, mean_sq),)} leaves of the MOMENTS tree -> {'mean', 'var'}."""
  if 'moments' in tree:
    ((mean, mean_sq),) = tree['moments']
    return {'mean': mean, 'var': jnp.maximum(mean_sq - jnp.square(mean), 0.0)}
  return {name: _to_stats(sub) for name, sub in tree.items()}


def population_stats(moments_fn: Callable[[Any, Any], dict], params: Any, batches: Iterable[Any]) -> dict:
  """{STATS: ...}: the mean over equal-size batches of each BatchNorm's batch moments, as mean and variance.

  moments_fn(params, batch) returns the MOMENTS collection of a training-mode forward pass (batch_moments).
  With equal batch sizes the mean of the batch means and mean squares is the population's; the variance is
  then E[x^2] - E[x]^2 (the layers below normalised by their batch statistics, as in training).
  """
  total, count = None, 0
  for batch in batches:
    moments = moments_fn(params, batch)
    total = moments if total is None else jax.tree.map(jnp.add, total, moments)
    count += 1
  if total is None:
    raise ValueError('population_stats needs at least one batch')
  return {STATS: _to_stats(jax.tree.map(lambda t: t / count, total))}


def batch_moments(model: nn.Module, params: Any, images: jax.Array) -> dict:
  """The MOMENTS collection of a training-mode forward pass.

  Dropout draws from a fixed key; in StrongCNN it follows the last BatchNorm, so it does not touch the moments.
  """
  _, state = model.apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(0)}, mutable=[MOMENTS])
  return state[MOMENTS]
