"""Homework question 2.1 measured: a convolution commutes with translations, max pooling and dense layers do not.

T_s shifts an image by s = (rows, columns). A layer f commutes with T_s when f(T_s x) = T_s' f(x) for
the matching output shift s' (s itself for a stride-1 convolution). Every check returns the measured
relative difference max |f(T x) - T' f(x)| / max |f(x)| and whether it is on the stated side of the
configured tolerance; `cli` prints them.
"""

from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_caption.errors import UserError
from cnn_caption.models.classifier import max_pool_2x2


@dataclasses.dataclass(frozen=True)
class Check:
  """One verdict: what was claimed, the measured figure with its criterion, and whether the claim holds."""

  name: str
  detail: str  # the measured figure and the criterion
  passed: bool
  difference: float = float('nan')  # the measured relative difference


def roll(x_BxHxWxC: jax.Array, shift: tuple[int, int]) -> jax.Array:
  """Circular translation by (rows, columns)."""
  return jnp.roll(x_BxHxWxC, shift, axis=(1, 2))


def translate(x_BxHxWxC: jax.Array, shift: tuple[int, int]) -> jax.Array:
  """Translation by non-negative (rows, columns) that fills the uncovered border with zeros."""
  dy, dx = shift
  _, h, w, _ = x_BxHxWxC.shape
  return jnp.pad(x_BxHxWxC, ((0, 0), (dy, 0), (dx, 0), (0, 0)))[:, :h, :w]


def _relative(a: jax.Array, b: jax.Array, scale: jax.Array) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(scale))))


def _min_over_output_shifts(fx_BxHxWxC: jax.Array, target_BxHxWxC: jax.Array) -> tuple[float, tuple[int, int]]:
  """The smallest relative difference between target and any circular translation of fx, and that shift."""
  fx, target = np.asarray(fx_BxHxWxC), np.asarray(target_BxHxWxC)
  _, h, w, _ = fx.shape
  # numpy: one jnp.roll per static shift would compile one program each.
  return min((_relative(target, np.roll(fx, s, axis=(1, 2)), fx), s) for s in itertools.product(range(h), range(w)))


def _validate(config: ml_collections.ConfigDict) -> None:
  check = config.get('check')
  if check is None or 'shift' not in check or 'image_shape' not in check:
    raise UserError(
      'this config has no check.shift / check.image_shape: the equivariance check needs '
      '--config=configs/equivariance.py'
    )
  h, w, _ = check.image_shape
  dy, dx = check.shift
  r = check.kernel_size // 2
  if h % 2 or w % 2:
    raise UserError(f'config.check.image_shape={tuple(check.image_shape)}: H and W must be even for the 2x2 pool')
  if dy % 2 == 0 and dx % 2 == 0:
    raise UserError(
      f'config.check.shift={tuple(check.shift)}: make one component odd (an even shift is one the 2x2 pool follows)'
    )
  if not (0 <= dy and 0 <= dx and dy + 2 * r < h and dx + 2 * r < w):
    raise UserError(
      f'config.check.shift={tuple(check.shift)}: needs 0 <= shift and shift + kernel_size - 1 < '
      'image size, so an interior is left'
    )


def describe(config: ml_collections.ConfigDict) -> str:
  """One header line for the printed checks (validates the config first)."""
  _validate(config)
  check = config.check
  return (
    f'Translation checks (question 2.1): random {tuple(check.image_shape)} image, shift '
    f"{tuple(check.shift)}, seed {config.seed}; rel diff = max |f(T x) - T' f(x)| / max |f(x)|"
  )


def equivariance_checks(config: ml_collections.ConfigDict) -> list[Check]:
  """Measures question 2.1's statements on a random image with random layer weights.

  Args:
    config: configs/equivariance.py layout: seed and check (image shape, channels, kernel size, units,
      shift, tolerances).

  Returns:
    Checks in order: circular conv commutes; zero-padded conv commutes on the interior; ... differs on the
    whole image; max pool does not commute with the (odd) shift; max pool commutes with the doubled shift;
    the dense layer does not commute; the control (a wrong output shift must differ).
  """
  _validate(config)
  check = config.check
  shift, same, differ = tuple(check.shift), check.same_rtol, check.differ_rtol
  key_x, key_circ, key_zero, key_fc = jax.random.split(jax.random.key(config.seed), 4)
  x = jax.random.normal(key_x, (1, *check.image_shape), jnp.float32)
  kernel = (check.kernel_size, check.kernel_size)

  def conv(padding, key):
    layer = nn.Conv(check.channels, kernel, padding=padding)
    params = layer.init(key, x)
    # A non-zero bias too: a translation must carry it along like any other output.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape), params)
    return lambda v: layer.apply(params, v)

  checks = []

  def claim(name, diff, equal: bool):
    if equal:
      detail = f'max rel diff {diff:.2e} (must be <= {same:.0e})'
      checks.append(Check(name=name, detail=detail, passed=diff <= same, difference=diff))
    else:
      detail = f'max rel diff {diff:.2e} (must be >= {differ:.0e})'
      checks.append(Check(name=name, detail=detail, passed=diff >= differ, difference=diff))

  conv_circ = conv('CIRCULAR', key_circ)
  y = conv_circ(x)
  claim(
    f'conv {kernel[0]}x{kernel[1]}, circular padding: conv(T x) == T conv(x), shift {shift}',
    _relative(conv_circ(roll(x, shift)), roll(y, shift), y),
    equal=True,
  )

  conv_zero = conv('SAME', key_zero)
  y0 = conv_zero(x)
  lhs, rhs = conv_zero(translate(x, shift)), translate(y0, shift)
  # Rows/columns whose window neither reaches the zero-filled strip nor the image border.
  r = check.kernel_size // 2
  (dy, dx), (h, w) = shift, check.image_shape[:2]
  interior = (slice(None), slice(dy + r, h - r), slice(dx + r, w - r))
  claim(
    f'conv {kernel[0]}x{kernel[1]}, zero padding: equal on the interior crop '
    f'rows {dy + r}..{h - r - 1}, cols {dx + r}..{w - r - 1}',
    _relative(lhs[interior], rhs[interior], y0),
    equal=True,
  )
  claim(
    'conv, zero padding, whole image: differs at the border (why the crop is needed)',
    _relative(lhs, rhs, y0),
    equal=False,
  )

  pooled = max_pool_2x2(x)
  diff, best = _min_over_output_shifts(pooled, max_pool_2x2(roll(x, shift)))
  claim(
    f"max pool 2x2: pool(T x) != T' pool(x) for every output shift T' (input shift {shift}; "
    f'closest output shift {best})',
    diff,
    equal=False,
  )
  doubled = (2 * shift[0], 2 * shift[1])
  claim(
    f'max pool 2x2 with a shift of a multiple of its stride {doubled}: pool(T x) == T/2 pool(x)',
    _relative(max_pool_2x2(roll(x, doubled)), roll(pooled, shift), pooled),
    equal=True,
  )

  dense = nn.Dense(check.fc_units)
  dense_params = dense.init(key_fc, x.reshape(1, -1))
  fc = lambda v: dense.apply(dense_params, v.reshape(1, -1)).reshape(1, check.fc_units, 1, 1)
  z = fc(x)
  diff, best = _min_over_output_shifts(z, fc(roll(x, shift)))
  claim(
    f'fully connected ({int(np.prod(check.image_shape))} -> {check.fc_units}): fc(T x) != any cyclic shift '
    f'of fc(x) (closest {best[0]})',
    diff,
    equal=False,
  )

  wrong = (shift[0] + 1, shift[1])
  claim(
    f'control: circular conv compared with the wrong output shift {wrong} must differ',
    _relative(conv_circ(roll(x, shift)), roll(y, wrong), y),
    equal=False,
  )
  return checks
