"""Dropout whose random bits are one fused elementwise loop on XLA:CPU.

jax.random's Threefry-2x32 lowers on CPU as a rolled loop of 5 iterations (4 rounds each), which XLA runs as a
`while` with several small ops per iteration: at the homework's batch of 8 the dropout mask cost 6% of the
training step (docs/benchmarks.md). The same generator written out round by round (threefry2x32 below) is
plain elementwise integer arithmetic on a counter, one fusion. The masks are other random draws than
nn.Dropout's (another counter layout), so a model using it trains on other masks, as with another seed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key0, key1, count0, count1) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block cipher, 20 rounds (Salmon et al., SC 2011), elementwise.

  uint32 key words and counter words (broadcastable) to two uint32 words.
  """
  keys = (key0, key1, key0 ^ key1 ^ _PARITY)
  x0, x1 = count0 + key0, count1 + key1
  for block in range(5):
    for bits in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, bits) ^ x0
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 random bits of `shape` from a jax PRNG key.

  Threefry-2x32 of the counters 0, 1, ... under the key's two words (a threefry key's own data; a key of
  another generator gives two words of its own first).
  """
  words = jax.random.key_data(key).reshape(-1)
  if words.shape != (2,):
    words = jax.random.bits(key, (2,), jnp.uint32)
  size = int(np.prod(shape))
  half = (size + 1) // 2
  counter = jax.lax.iota(jnp.uint32, half)
  y0, y1 = threefry2x32(words[0], words[1], counter, jnp.zeros_like(counter))
  return jnp.concatenate([y0, y1])[:size].reshape(shape)


class FusedDropout(nn.Module):
  """nn.Dropout's interface and scaling, its mask from random_bits.

  Keeps each value with probability 1 - rate and scales the kept ones by 1 / (1 - rate); the mask compares
  random_bits of the module's 'dropout' rng stream with an integer threshold.
  """

  rate: float
  deterministic: bool | None = None
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    bits = random_bits(self.make_rng(self.rng_collection), x.shape)
    keep = bits >= np.uint32(min(round(self.rate * 2.0**32), 2**32 - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
