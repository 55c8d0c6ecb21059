"""The homework's Fashion-MNIST CNN (question 2)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_caption.models import dropout


def max_pool_2x2_strided(x_BxHxWxC: jax.Array) -> jax.Array:
  """max_pool_2x2 as the maximum of the 4 strided views of each window.

  Elementwise, so XLA fuses it with an elementwise producer (conv1's multiply-adds) instead of writing the
  producer out and reducing it.
  """
  h, w = x_BxHxWxC.shape[1] // 2 * 2, x_BxHxWxC.shape[2] // 2 * 2
  x = x_BxHxWxC[:, :h, :w]
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]), jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


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


def _relu_max_pool_bwd(residuals, dy_BxhxwxC):
  x_BxHxWxC, y_BxhxwxC = residuals
  b, h, w, c = y_BxhxwxC.shape
  x = x_BxHxWxC[:, : 2 * h, : 2 * w].reshape(b, h, 2, w, 2, c)
  winner = (x > 0) & (x == y_BxhxwxC[:, :, None, :, None])
  dx = jnp.where(winner, dy_BxhxwxC[:, :, None, :, None], 0).reshape(b, 2 * h, 2 * w, c)
  pad = ((0, 0), (0, x_BxHxWxC.shape[1] - 2 * h), (0, x_BxHxWxC.shape[2] - 2 * w), (0, 0))
  return (jnp.pad(dx, pad).astype(x_BxHxWxC.dtype),)


def _relu_then(pool, doc: str):
  """pool(relu(x)) as a custom_vjp function whose backward is _relu_max_pool_bwd (pool: a 2x2 max-pool)."""

  def forward(x_BxHxWxC):
    return pool(jnp.maximum(x_BxHxWxC, 0))

  def forward_with_residuals(x_BxHxWxC):
    y = forward(x_BxHxWxC)
    return y, (x_BxHxWxC, y)

  forward.__doc__ = doc
  fn = jax.custom_vjp(forward)
  fn.defvjp(forward_with_residuals, _relu_max_pool_bwd)
  return fn


relu_max_pool_2x2 = _relu_then(
  max_pool_2x2,
  """max_pool_2x2(relu(x)) with a written-out backward: one elementwise pass, no reductions.

  The gradient goes to every input equal to its window's maximum that is positive (exact float ties within a
  window, which need two equal positive activations, each get it; autodiff would split it among them).
  """,
)
relu_max_pool_2x2_strided = _relu_then(
  max_pool_2x2_strided,
  'relu_max_pool_2x2 with its forward as max_pool_2x2_strided (the same values and the same backward).',
)


class ReluMaxPool2x2(nn.Module):
  """relu_max_pool_2x2 as a (parameter-free) module, a row of the per-layer summary.

  strided: the forward as the maximum of 4 strided views (fused with an elementwise producer such as conv1's
  multiply-adds); after a convolution, reshape-and-max (a YNNPACK reduction) is the faster one on XLA:CPU.
  """

  strided: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return (relu_max_pool_2x2_strided if self.strided else relu_max_pool_2x2)(x_BxHxWxC)


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


@jax.custom_vjp
def conv3x3_one_channel(x_BxHxWx1: jax.Array, kernel_3x3x1xF: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution of a one-channel image as 9 broadcast multiply-adds (no bias).

  A one-channel convolution is a 9-deep contraction: XLA:CPU fuses the 9 products into one loop, where its
  convolution kernel and a 9-deep matmul both waste most of the vector width. The image gets no gradient
  (it is data); the kernel's gradient is one 9 x F matmul over all pixels. The channel axis is dropped
  while the taps are formed: shifted windows with a one-element minor axis are slow to gather.
  """
  _, h, w, _ = x_BxHxWx1.shape
  padded_BxHxW = jnp.pad(x_BxHxWx1[..., 0], ((0, 0), (1, 1), (1, 1)))
  kernel_9xF = kernel_3x3x1xF.reshape(9, -1)
  out = None
  for t in range(9):
    i, j = divmod(t, 3)
    term = padded_BxHxW[:, i : i + h, j : j + w, None] * kernel_9xF[t]
    out = term if out is None else out + term
  return out


def _conv3x3_one_channel_fwd(x_BxHxWx1, kernel_3x3x1xF):
  return conv3x3_one_channel(x_BxHxWx1, kernel_3x3x1xF), (x_BxHxWx1, kernel_3x3x1xF)


def _conv3x3_one_channel_bwd(residuals, dy_BxHxWxF):
  x_BxHxWx1, kernel_3x3x1xF = residuals
  _, h, w, _ = x_BxHxWx1.shape
  padded_BxHxW = jnp.pad(x_BxHxWx1[..., 0], ((0, 0), (1, 1), (1, 1)))
  taps_9xBxHxW = jnp.stack([padded_BxHxW[:, i : i + h, j : j + w] for i in range(3) for j in range(3)])
  dkernel_9xF = jnp.einsum('tbhw,bhwf->tf', taps_9xBxHxW, dy_BxHxWxF)
  return jnp.zeros_like(x_BxHxWx1), dkernel_9xF.reshape(kernel_3x3x1xF.shape).astype(kernel_3x3x1xF.dtype)


conv3x3_one_channel.defvjp(_conv3x3_one_channel_fwd, _conv3x3_one_channel_bwd)


class OneChannelConv3x3(nn.Module):
  """3x3 'SAME' convolution of a one-channel image (conv3x3_one_channel); nn.Conv's parameters and init.

  The same function as nn.Conv up to float rounding (another summation order).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWx1: jax.Array) -> jax.Array:
    if x_BxHxWx1.shape[-1] != 1:
      raise ValueError(f'OneChannelConv3x3 takes one input channel, not {x_BxHxWx1.shape[-1]}')
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (3, 3, 1, self.features))
    bias_F = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x_BxHxWx1, kernel, bias_F = nn.dtypes.promote_dtype(x_BxHxWx1, kernel, bias_F, dtype=self.dtype)
    return conv3x3_one_channel(x_BxHxWx1, kernel) + bias_F


_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def _conv_valid(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x_BxHxWxC, kernel_KxKxCxF, (1, 1), 'VALID', dimension_numbers=_NHWC_HWIO)


@jax.custom_vjp
def conv_valid_matmul_input_grad(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array) -> jax.Array:
  """A 'VALID' stride-1 convolution (nn.Conv's, bit for bit) whose input gradient is one matmul.

  The input gradient of a convolution is a 'full' convolution of the output gradient with the flipped kernel;
  XLA:CPU's convolution runs it at a third of the core's matmul rate for the homework's conv2 (32 -> 16
  channels at 12x12). Here each output pixel's gradient goes through the kernel as one (F x K*K*C) matmul for
  all pixels at once, and the K*K shifted pieces are summed into place (one fused elementwise pass). The forward
  and the kernel gradient are XLA's convolutions, as nn.Conv's.
  """
  return _conv_valid(x_BxHxWxC, kernel_KxKxCxF)


def _conv_valid_matmul_input_grad_fwd(x_BxHxWxC, kernel_KxKxCxF):
  return _conv_valid(x_BxHxWxC, kernel_KxKxCxF), (x_BxHxWxC, kernel_KxKxCxF)


def _conv_valid_matmul_input_grad_bwd(residuals, dy_BxhxwxF):
  x_BxHxWxC, kernel_KxKxCxF = residuals
  kh, kw, c, f = kernel_KxKxCxF.shape
  b, h, w, _ = dy_BxhxwxF.shape
  _, kernel_vjp = jax.vjp(lambda k: _conv_valid(x_BxHxWxC, k), kernel_KxKxCxF)
  (dkernel,) = kernel_vjp(dy_BxhxwxF)
  dpieces = (dy_BxhxwxF.reshape(-1, f) @ kernel_KxKxCxF.reshape(-1, f).T).reshape(b, h, w, kh, kw, c)
  dx = None
  for i in range(kh):
    for j in range(kw):
      piece = jnp.pad(dpieces[:, :, :, i, j], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
      dx = piece if dx is None else dx + piece
  return dx.astype(x_BxHxWxC.dtype), dkernel


conv_valid_matmul_input_grad.defvjp(_conv_valid_matmul_input_grad_fwd, _conv_valid_matmul_input_grad_bwd)


class MatmulInputGradConv(nn.Module):
  """nn.Conv(features, kernel_size, padding='VALID') whose input gradient is conv_valid_matmul_input_grad's.

  The same parameters, init and forward as nn.Conv, bit for bit; the same gradients up to rounding (another
  summation order).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, x_BxHxWxC.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    bias_F = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x_BxHxWxC, kernel, bias_F = nn.dtypes.promote_dtype(x_BxHxWxC, kernel, bias_F, dtype=self.dtype)
    return conv_valid_matmul_input_grad(x_BxHxWxC, kernel) + bias_F


# Up to this many rows the kernel gradient is written as a sum of outer products (dense_outer_grad): a win
# on the homework's batch of 8, level at 16 and slower from 32 on (docs/benchmarks.md).
OUTER_GRAD_MAX_ROWS = 8


@jax.custom_vjp
def dense_outer_grad(x_BxK: jax.Array, kernel_KxN: jax.Array) -> jax.Array:
  """x @ kernel whose kernel gradient is the sum of the batch's B outer products, written out elementwise.

  Autodiff makes the kernel gradient a matmul with a B-deep contraction: at B = 8 it writes the whole gradient
  out, and the optimizer's update then reads it back with the kernel and writes the kernel, four passes over a
  weight (fc1's is 2.76 MB) larger than the core's cache. A sum of B broadcast products is elementwise, so XLA
  fuses it into a plain SGD update: the kernel is read once and written once. The input gradient is the usual
  matmul. The same function and gradients as nn.Dense's up to rounding (another summation order).
  """
  return x_BxK @ kernel_KxN


def _dense_outer_grad_fwd(x_BxK, kernel_KxN):
  return x_BxK @ kernel_KxN, (x_BxK, kernel_KxN)


def _dense_outer_grad_bwd(residuals, dy_BxN):
  x_BxK, kernel_KxN = residuals
  dkernel_KxN = x_BxK[0][:, None] * dy_BxN[0][None, :]
  for i in range(1, x_BxK.shape[0]):
    dkernel_KxN = dkernel_KxN + x_BxK[i][:, None] * dy_BxN[i][None, :]
  return dy_BxN @ kernel_KxN.T, dkernel_KxN


dense_outer_grad.defvjp(_dense_outer_grad_fwd, _dense_outer_grad_bwd)


class SmallBatchDense(nn.Module):
  """nn.Dense (same parameters and init) whose kernel gradient is dense_outer_grad's at a few rows.

  From OUTER_GRAD_MAX_ROWS + 1 rows on (large batches, evaluation), and whenever the batch is split over
  several devices, it is nn.Dense's matmul. Split over devices, each device holds only some of the rows, so the
  per-row outer products would cost one cross-device collective per row and layer (over gloo between processes,
  a few milliseconds each, measured: 56 all-reduces, up to 0.22 s a batch-8 step), and the gradient must be reduced
  across devices before the update anyway, so the fusion it exists for cannot happen.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxK: jax.Array) -> jax.Array:
    kernel_KxN = self.param('kernel', nn.initializers.lecun_normal(), (x_BxK.shape[-1], self.features))
    bias_N = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x_BxK, kernel_KxN, bias_N = nn.dtypes.promote_dtype(x_BxK, kernel_KxN, bias_N, dtype=self.dtype)
    if x_BxK.ndim == 2 and x_BxK.shape[0] <= OUTER_GRAD_MAX_ROWS and jax.device_count() == 1:
      return dense_outer_grad(x_BxK, kernel_KxN) + bias_N
    return x_BxK @ kernel_KxN + bias_N


class FashionCNN(nn.Module):
  """conv16 3x3 same -> ReLU -> pool2 -> conv32 3x3 valid -> ReLU -> pool2 -> 600 -> 120 -> 10, log-softmax."""

  num_classes: int = 10
  dropout: float = 0.5
  conv1_channels: int = 16
  conv2_channels: int = 32
  hidden1: int = 600
  hidden2: int = 120
  conv1_as_matmul: bool = False  # conv1 as ShiftedSlicesConv3x3 (same parameters; faster, other rounding)
  # conv1 as OneChannelConv3x3, each ReLU + pool as ReluMaxPool2x2 (pool1's forward strided), conv2 as
  # MatmulInputGradConv, the dense layers as SmallBatchDense and dropout as dropout.FusedDropout: the same function,
  # faster on CPU, other float rounding and other dropout masks; False is the original program, bit for bit.
  fast_layers: bool = False
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for config.half_precision); parameters stay float32

  @nn.compact
  def __call__(self, x_BxHxWx1: jax.Array, *, train: bool = False) -> jax.Array:
    if self.fast_layers:
      x = OneChannelConv3x3(self.conv1_channels, dtype=self.dtype, name='conv1')(x_BxHxWx1)
    elif self.conv1_as_matmul:
      x = ShiftedSlicesConv3x3(self.conv1_channels, dtype=self.dtype, name='conv1')(x_BxHxWx1)
    else:
      x = nn.Conv(self.conv1_channels, (3, 3), padding='SAME', dtype=self.dtype, name='conv1')(x_BxHxWx1)
    x = ReluMaxPool2x2(strided=True, name='pool1')(x) if self.fast_layers else MaxPool2x2(name='pool1')(nn.relu(x))
    if self.fast_layers:
      x = MatmulInputGradConv(self.conv2_channels, dtype=self.dtype, name='conv2')(x)
    else:
      x = nn.Conv(self.conv2_channels, (3, 3), padding='VALID', dtype=self.dtype, name='conv2')(x)
    x = ReluMaxPool2x2(name='pool2')(x) if self.fast_layers else MaxPool2x2(name='pool2')(nn.relu(x))
    # Flatten in (C, H, W) order as torch's x.view(B, -1) did, so a ported torch fc1 would line up.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    dense = SmallBatchDense if self.fast_layers else nn.Dense
    x = nn.relu(dense(self.hidden1, dtype=self.dtype, name='fc1')(x))
    x = (dropout.FusedDropout if self.fast_layers else nn.Dropout)(self.dropout, deterministic=not train)(x)
    x = nn.relu(dense(self.hidden2, dtype=self.dtype, name='fc2')(x))
    logits = dense(self.num_classes, dtype=self.dtype, name='fc3')(x)
    return nn.log_softmax(logits.astype(jnp.float32))
