"""The homework's Fashion-MNIST CNN (question 2)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, floor mode; reshape-and-max has a faster backward on CPU than nn.max_pool."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MaxPool2x2(nn.Module):
  """max_pool_2x2 as a (parameter-free) module, so it is a row of the per-layer summary."""

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return max_pool_2x2(x_BxHxWxC)


class ShiftedSlicesConv3x3(nn.Module):
  """3x3 'SAME' convolution as 9 shifted slices and one (9*C)xF matmul; nn.Conv's parameter names and init.

  For the one-channel first layer this is 1.27x faster on the whole training step than lax.conv on XLA:CPU
  (batch 64, one pinned core): a convolution with one input channel is a poor fit for the
  convolution kernel, a 9-deep matmul is not. Opt-in (FashionCNN.conv1_as_matmul): its floats differ from
  lax.conv's by ~1e-7, which moved the homework run's 15-epoch test accuracy by 0.39 points (README).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    channels = x_BxHxWxC.shape[-1]
    kernel_3x3xCxF = self.param('kernel', nn.initializers.lecun_normal(), (3, 3, channels, self.features))
    bias_F = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x_BxHxWxC, kernel_3x3xCxF, bias_F = nn.dtypes.promote_dtype(x_BxHxWxC, kernel_3x3xCxF, bias_F, dtype=self.dtype)
    b, h, w, _ = x_BxHxWxC.shape
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap order (di, dj, c) matches the HWIO kernel flattened to (9*C, F).
    taps_BxHxWx9xC = jnp.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=3)
    return taps_BxHxWx9xC.reshape(b, h, w, 9 * channels) @ kernel_3x3xCxF.reshape(9 * channels, -1) + bias_F


class FashionCNN(nn.Module):
  """conv16 3x3 same -> ReLU -> pool2 -> conv32 3x3 valid -> ReLU -> pool2 -> 600 -> 120 -> 10, log-softmax."""

  num_classes: int = 10
  dropout: float = 0.5
  conv1_channels: int = 16
  conv2_channels: int = 32
  hidden1: int = 600
  hidden2: int = 120
  conv1_as_matmul: bool = False  # conv1 as ShiftedSlicesConv3x3 (same parameters; faster, other rounding)
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for config.half_precision); parameters stay float32

  @nn.compact
  def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
    if self.conv1_as_matmul:
      x = ShiftedSlicesConv3x3(self.conv1_channels, dtype=self.dtype, name='conv1')(x_BxHxWx1)
    else:
      x = nn.Conv(self.conv1_channels, (3, 3), padding='SAME', dtype=self.dtype, name='conv1')(x_BxHxWx1)
    x = MaxPool2x2(name='pool1')(nn.relu(x))
    x = nn.Conv(self.conv2_channels, (3, 3), padding='VALID', dtype=self.dtype, name='conv2')(x)
    x = MaxPool2x2(name='pool2')(nn.relu(x))
    # Flatten in (C, H, W) order as torch's x.view(B, -1) did, so a ported torch fc1 would line up.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden1, dtype=self.dtype, name='fc1')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.hidden2, dtype=self.dtype, name='fc2')(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc3')(x)
    return nn.log_softmax(logits.astype(jnp.float32))
