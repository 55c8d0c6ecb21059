"""A stronger small Fashion-MNIST CNN (configs/classifier.py:strong): the homework's family, wider and normalised.

GroupNorm instead of BatchNorm: the generic train step carries no mutable batch statistics, and
GroupNorm needs none (train and eval compute the same function).

Pooling is flax's `nn.max_pool`, not classifier.max_pool_2x2: behind GroupNorm + ReLU, the jitted gradient
of the reshape-and-max pool came out NaN on XLA:CPU (jax 0.10.2; finite without jit and with nn.max_pool),
presumably a fused recomputation of the window maximum that no longer equals any element, so the
tie-splitting gradient divides 0 by 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvBlock(nn.Module):
  """3x3 conv (same padding, no bias) -> GroupNorm -> ReLU."""

  channels: int
  groups: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x = nn.Conv(self.channels, (3, 3), padding='SAME', use_bias=False, name='conv')(x_BxHxWxC)
    return nn.relu(nn.GroupNorm(num_groups=min(self.groups, self.channels), name='norm')(x))


class StrongCNN(nn.Module):
  """[conv c1, conv c1, pool] -> [conv c2, conv c2, pool] -> conv c3 -> global mean -> dropout -> dense, log-softmax."""

  num_classes: int = 10
  dropout: float = 0.2
  channels: tuple[int, int, int] = (32, 64, 128)
  groups: int = 8

  @nn.compact
  def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
    c1, c2, c3 = self.channels
    x = ConvBlock(c1, self.groups, name='block1a')(x_BxHxWx1)
    x = ConvBlock(c1, self.groups, name='block1b')(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(c2, self.groups, name='block2a')(x)
    x = ConvBlock(c2, self.groups, name='block2b')(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(c3, self.groups, name='block3')(x)
    feats_BxC = jnp.mean(x, axis=(1, 2))
    feats_BxC = nn.Dropout(self.dropout, deterministic=not train)(feats_BxC)
    return nn.log_softmax(nn.Dense(self.num_classes, name='head')(feats_BxC))
