"""The two small networks of homework question 1, for per-layer parameter and activation counts.

Pooling and softmax are functions in linen; they are wrapped in modules here so that they appear as
layers in `cnn_caption.analysis.layer_table`. Neither network has a hidden nonlinearity: the question
specifies none and it changes no count.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MaxPool(nn.Module):
  """`nn.max_pool` as a layer."""

  window: Sequence[int]
  strides: Sequence[int]
  padding: str = 'VALID'

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return nn.max_pool(x_BxHxWxC, tuple(self.window), strides=tuple(self.strides), padding=self.padding)


class Softmax(nn.Module):
  """`nn.softmax` over the last axis as a layer."""

  @nn.compact
  def __call__(self, logits_BxK: jax.Array) -> jax.Array:
    return nn.softmax(logits_BxK, axis=-1)


class Q1CNN(nn.Module):
  """conv (VALID) -> max-pool -> linear -> softmax; returns class probabilities (B, num_classes)."""

  features: int = 8
  kernel_size: Sequence[int] = (5, 5)
  strides: Sequence[int] = (1, 1)
  padding: str = 'VALID'
  pool_window: Sequence[int] = (4, 4)
  pool_strides: Sequence[int] = (2, 2)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    h = nn.Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides), padding=self.padding, name='conv')(
      x_BxHxWxC
    )
    h = MaxPool(self.pool_window, self.pool_strides, name='max_pool')(h)
    logits_BxK = nn.Dense(self.num_classes, name='linear')(h.reshape(h.shape[0], -1))
    return Softmax(name='softmax')(logits_BxK)


class Q1MLP(nn.Module):
  """Flattened image -> linear hidden_units -> linear num_classes -> softmax; returns probabilities."""

  hidden_units: int = 100
  num_classes: int = 10

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x_BxD = jnp.reshape(x_BxHxWxC, (x_BxHxWxC.shape[0], -1))
    h_BxU = nn.Dense(self.hidden_units, name='hidden')(x_BxD)
    logits_BxK = nn.Dense(self.num_classes, name='output')(h_BxU)
    return Softmax(name='softmax')(logits_BxK)
