"""models/dropout.py: the written-out Threefry-2x32 and the dropout built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption.models import dropout


@pytest.mark.parametrize(
  'key, counter, expected',
  [  # Random123's known-answer vectors for threefry2x32_20 (key words, counter words -> output words)
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  ],
)
def test_threefry_known_answers(key, counter, expected):
  out = dropout.threefry2x32(*(jnp.uint32(v) for v in (*key, *counter)))
  assert tuple(int(v) for v in out) == expected


def test_threefry_matches_jax_threefry():
  """Elementwise over many counters, the same words as jax's own Threefry-2x32 (its rolled-loop lowering)."""
  from jax._src.random import threefry2x32 as jax_threefry

  key = jnp.array([0x12345678, 0x9ABCDEF0], jnp.uint32)
  count = jax.random.bits(jax.random.key(0), (2, 1000), jnp.uint32)
  ours = jnp.concatenate(dropout.threefry2x32(key[0], key[1], count[0], count[1]))
  np.testing.assert_array_equal(ours, jax_threefry.threefry_2x32((key[0], key[1]), count.ravel()))


def test_random_bits_are_uniform_and_keyed():
  bits = dropout.random_bits(jax.random.key(3), (200, 501))  # odd size: the last counter's second word is dropped
  assert bits.shape == (200, 501) and bits.dtype == jnp.uint32
  ones = (bits[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  np.testing.assert_allclose(ones.mean(axis=(0, 1)), 0.5, atol=0.01)  # every bit position is fair
  assert len(np.unique(np.asarray(bits))) > 0.99 * bits.size
  np.testing.assert_array_equal(bits, dropout.random_bits(jax.random.key(3), (200, 501)))
  assert np.mean(np.asarray(bits == dropout.random_bits(jax.random.key(4), (200, 501)))) < 0.01
  rbg = dropout.random_bits(jax.random.key(3, impl='rbg'), (8, 9))  # a key of another generator still works
  assert rbg.shape == (8, 9) and len(np.unique(np.asarray(rbg))) == 72


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.9])
def test_fused_dropout_keeps_one_minus_rate_and_rescales(rate):
  x = jnp.ones((400, 500))
  y = dropout.FusedDropout(rate).apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  kept = np.asarray(y != 0)
  assert abs(kept.mean() - (1 - rate)) < 0.005
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / (1 - rate), rtol=1e-6)
  np.testing.assert_allclose(float(y.mean()), 1.0, atol=0.02)  # expectation preserved


def test_fused_dropout_passes_through_when_deterministic_or_rate_zero():
  x = jax.random.normal(jax.random.key(0), (4, 6))
  np.testing.assert_array_equal(dropout.FusedDropout(0.5, deterministic=True).apply({}, x), x)
  out = dropout.FusedDropout(0.0).apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_array_equal(out, x)
  assert not jnp.any(dropout.FusedDropout(1.0).apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(1)}))
  with pytest.raises(ValueError, match='deterministic'):  # nn.Dropout's contract: deterministic given somewhere
    dropout.FusedDropout(0.5).apply({}, x, rngs={'dropout': jax.random.key(1)})


def test_fused_dropout_draws_its_mask_outside_loops():
  """The point of the module: the mask's bits come from no `while`.

  jax's CPU Threefry lowering is a rolled loop of 5 iterations; the only loop left here is flax's fold-in of the
  module's key (two key words, no mask).
  """
  import re

  def loop_shapes(hlo):
    return [re.findall(r'u32\[([\d,]*)\]', line.split(' while(')[0]) for line in hlo.splitlines() if ' while(' in line]

  x = jnp.ones((8, 600))
  fn = jax.jit(lambda k, x: dropout.FusedDropout(0.5).apply({}, x, deterministic=False, rngs={'dropout': k}))
  for shapes in loop_shapes(fn.lower(jax.random.key(0), x).compile().as_text()):
    assert all(int(np.prod([int(d) for d in s.split(',') if d])) <= 4 for s in shapes), shapes
  ref = jax.jit(lambda k: jax.random.bernoulli(k, 0.5, x.shape)).lower(jax.random.key(0)).compile().as_text()
  assert any('2400' in s or '8,600' in s for shapes in loop_shapes(ref) for s in shapes)  # nn.Dropout's mask: a loop
