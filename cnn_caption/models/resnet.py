"""A small pre-activation ResNet for Fashion-MNIST (configs/classifier.py:resnet), shaped for XLA:CPU speed.

Stem: a 3x3 convolution of the 28x28x1 image (stride `stem_stride`: 2 puts the first stage at 14x14). Stage i
has `blocks[i]` pre-activation residual blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks":
BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus the shortcut) of `widths[i]` channels; every stage after
the first starts with a stride-2 block whose shortcut is a strided 1x1 projection (SAME padding: 14 -> 7 -> 4).
Then BN -> ReLU -> global average pooling -> dense to the classes, log-softmax: no large dense layer.

Convolutions carry no bias (a BatchNorm follows each). A 3x3 convolution is lax.conv (`conv='lax'`) or 9 shifted
slices and one matmul (`conv='slices'`, as models/classifier.py's); at these widths lax.conv trained 1.7-2.5x
faster on one XLA:CPU core (bench/probe_strong.py --variant=resnet). BatchNorm is
models/norm.py's: batch statistics in training, population statistics recomputed for evaluation, so the generic
train step carries no mutable state.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_caption.errors import UserError
from cnn_caption.models import norm as norm_lib


def _out_size(size: int, stride: int) -> int:
  return -(-size // stride)  # SAME padding: ceil(size / stride)


class Conv3x3(nn.Module):
  """3x3 convolution, padding 1, optional stride, no bias: lax.conv, or 9 shifted (strided) slices and a matmul."""

  features: int
  stride: int = 1
  impl: str = 'lax'  # 'lax' or 'slices'

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    c = x_BxHxWxC.shape[-1]
    kernel_3x3xCxF = self.param('kernel', nn.initializers.he_normal(), (3, 3, c, self.features))
    b, h, w, _ = x_BxHxWxC.shape
    s = self.stride
    if self.impl == 'lax':
      return jax.lax.conv_general_dilated(
        x_BxHxWxC, kernel_3x3xCxF, (s, s), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
    ho, wo = _out_size(h, s), _out_size(w, s)
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap order (di, dj, c) matches the HWIO kernel flattened to (9*C, F).
    taps = [padded[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s] for i in range(3) for j in range(3)]
    taps_BxHoxWox9C = jnp.concatenate(taps, axis=-1)
    return taps_BxHoxWox9C @ kernel_3x3xCxF.reshape(9 * c, self.features)


class PreActBlock(nn.Module):
  """BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv3x3, plus the input (or its strided 1x1 projection)."""

  features: int
  stride: int = 1
  conv: str = 'lax'

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    act = nn.relu(norm_lib.BatchNorm(name='norm1')(x_BxHxWxC, train=train))
    shortcut = x_BxHxWxC
    if self.stride != 1 or x_BxHxWxC.shape[-1] != self.features:
      # From the activated input, as in the paper's projection shortcuts; stride s samples every s-th position.
      s = self.stride
      shortcut = nn.Dense(self.features, use_bias=False, name='proj')(act[:, ::s, ::s])
    y = Conv3x3(self.features, self.stride, self.conv, name='conv1')(act)
    y = nn.relu(norm_lib.BatchNorm(name='norm2')(y, train=train))
    # Zero-init of the residual branch's last scale would make each block start as the identity; He init keeps
    # the plain form here (BatchNorm already bounds the activations).
    y = Conv3x3(self.features, 1, self.conv, name='conv2')(y)
    return y + shortcut


class ResNet(nn.Module):
  """stem conv3x3 -> stages of PreActBlocks -> BN -> ReLU -> global average pool -> dense, log-softmax.

  Defaults are configs/classifier.py:resnet's.
  """

  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128)
  blocks: tuple[int, ...] = (2, 2, 2)
  stem_stride: int = 2
  conv: str = 'lax'

  @nn.compact
  def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
    self.check_fields()
    x = Conv3x3(self.widths[0], self.stem_stride, self.conv, name='stem')(x_BxHxWx1)
    for i, (width, n) in enumerate(zip(self.widths, self.blocks)):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        x = PreActBlock(width, stride, self.conv, name=f'stage{i + 1}_block{j + 1}')(x, train=train)
    x = nn.relu(norm_lib.BatchNorm(name='norm_out')(x, train=train))
    feats_BxC = x.mean(axis=(1, 2))
    return nn.log_softmax(nn.Dense(self.num_classes, name='head')(feats_BxC))

  def check_fields(self) -> None:
    if len(self.widths) != len(self.blocks) or not self.widths:
      raise UserError(
        f'config.model.widths={self.widths} and config.model.blocks={self.blocks} must have one entry per stage'
      )
    if min(self.blocks) < 1:
      raise UserError(f'config.model.blocks={self.blocks}: every stage needs at least one block')
    if self.conv not in ('lax', 'slices'):
      raise UserError(f"config.model.conv={self.conv!r} is unknown: use 'lax' or 'slices'")
    if self.stem_stride not in (1, 2):
      raise UserError(f'config.model.stem_stride={self.stem_stride} must be 1 (28x28) or 2 (first stage at 14x14)')

  def multiply_adds(self, image_size: int = 28) -> int:
    """Multiply-adds of one image's forward pass in the convolutions, projections and head (not BN or ReLU)."""
    size = _out_size(image_size, self.stem_stride)
    total = size * size * 9 * 1 * self.widths[0]
    cin = self.widths[0]
    for i, (width, n) in enumerate(zip(self.widths, self.blocks)):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        size = _out_size(size, stride)
        total += size * size * 9 * (cin * width + width * width)
        if stride != 1 or cin != width:
          total += size * size * cin * width
        cin = width
    return total + cin * self.num_classes
