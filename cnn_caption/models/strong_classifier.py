"""A stronger small Fashion-MNIST CNN (configs/classifier.py:strong), shaped for XLA:CPU speed.

Every 3x3 convolution is classifier.ShiftedSlicesConv3x3 (9 shifted slices and one matmul): XLA:CPU runs
dense matmuls far faster than its convolutions (bench/probe_strong.py). Normalisation is optional: 'none',
'group' (GroupNorm; it cost 8-17% of the training step in the probe) or 'batch' (models/norm.py: batch
statistics in training, population statistics recomputed from the parameters for evaluation, so the generic
train step still carries no mutable state).

Pooling is 'reshape_max' (classifier.max_pool_2x2 after zero-padding odd sizes; 1.5x faster training step
than nn.max_pool in the probe) or 'max' (nn.max_pool). With GroupNorm only 'max' is allowed: behind GroupNorm
+ ReLU, the jitted gradient of the reshape-and-max pool came out NaN on XLA:CPU (jax 0.10.2; finite without
jit and with nn.max_pool), presumably a fused recomputation of the window maximum that no longer equals any
element, so the tie-splitting gradient divides 0 by 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_caption.errors import UserError
from cnn_caption.models import classifier
from cnn_caption.models import norm as norm_lib


class ConvBlock(nn.Module):
  """3x3 conv (same padding, as slices + matmul) -> optional GroupNorm or BatchNorm -> ReLU."""

  channels: int
  norm: str
  groups: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    x = classifier.ShiftedSlicesConv3x3(self.channels, name='conv')(x_BxHxWxC)
    if self.norm == 'group':
      x = nn.GroupNorm(num_groups=min(self.groups, self.channels), name='norm')(x)
    elif self.norm == 'batch':
      x = norm_lib.BatchNorm(name='norm')(x, train=train)
    elif self.norm != 'none':
      raise UserError(f"config.model.norm={self.norm!r} is unknown: use 'none', 'group' or 'batch'")
    return nn.relu(x)


class StrongCNN(nn.Module):
  """[space-to-depth] -> stages of [convs, 2x2 max-pool (SAME)] -> flatten -> dense -> dropout -> dense, log-softmax.

  Stage i has convs_per_stage[i] convs of channels[i]; 28x28 input, space-to-depth 2: stages at 14x14 and 7x7,
  4x4 after the last pool. Defaults are configs/classifier.py:strong's.
  """

  num_classes: int = 10
  dropout: float = 0.0
  channels: tuple[int, ...] = (96, 192)
  convs_per_stage: tuple[int, ...] = (1, 1)
  hidden: int = 256
  norm: str = 'none'
  groups: int = 8
  pool: str = 'reshape_max'
  space_to_depth: int = 2

  @nn.compact
  def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
    if len(self.channels) != len(self.convs_per_stage):
      raise UserError(
        f'config.model.channels={self.channels} and config.model.convs_per_stage={self.convs_per_stage} '
        'must have one entry per stage'
      )
    if self.norm == 'group' and self.pool == 'reshape_max':
      raise UserError(
        "config.model.norm='group' needs config.model.pool='max' (the reshape-and-max pool's jitted gradient "
        'was NaN there)'
      )
    x = x_BxHxWx1
    if self.space_to_depth > 1:
      x = self._space_to_depth(x)
    for i, (c, n) in enumerate(zip(self.channels, self.convs_per_stage)):
      for j in range(n):
        x = ConvBlock(c, self.norm, self.groups, name=f'block{i + 1}{"abcdefgh"[j]}')(x, train=train)
      x = self._pool(x)
    feats_BxD = x.reshape(x.shape[0], -1)
    feats_BxD = nn.relu(nn.Dense(self.hidden, name='fc')(feats_BxD))
    feats_BxD = nn.Dropout(self.dropout, deterministic=not train)(feats_BxD)
    return nn.log_softmax(nn.Dense(self.num_classes, name='head')(feats_BxD))

  def _space_to_depth(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Each k x k block of pixels (row-major) becomes the k*k*C channels of one position."""
    k = self.space_to_depth
    b, h, w, c = x_BxHxWxC.shape
    if h % k or w % k:
      raise UserError(f'config.model.space_to_depth={k} does not divide the image size {h}x{w}; use 1 (off) or 2')
    x = x_BxHxWxC.reshape(b, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // k, w // k, k * k * c)

  def _pool(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.pool == 'max':
      return nn.max_pool(x_BxHxWxC, (2, 2), strides=(2, 2), padding='SAME')
    _, h, w, _ = x_BxHxWxC.shape
    # Zero rows/columns make odd sizes even: after ReLU that is max-pooling with SAME padding.
    x = jnp.pad(x_BxHxWxC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    if self.pool == 'reshape_max':
      return classifier.max_pool_2x2(x)
    raise UserError(f"config.model.pool={self.pool!r} is unknown: use 'reshape_max' or 'max'")
