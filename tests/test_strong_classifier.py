"""The strong Fashion-MNIST CNN (parameter count by hand, shapes) and the host augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption.data import augment
from cnn_caption.models import strong_classifier


def test_parameter_count_by_hand_and_output():
  model = strong_classifier.StrongCNN(channels=(32, 64, 128), groups=8)
  x = jnp.zeros((2, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  # conv (no bias) 3*3*cin*cout + GroupNorm scale and bias 2*cout per block; head 128*10 + 10.
  expected = (9 * 1 * 32 + 64) + (9 * 32 * 32 + 64) + (9 * 32 * 64 + 128) + (9 * 64 * 64 + 128) \
      + (9 * 64 * 128 + 256) + (128 * 10 + 10)
  assert sum(p.size for p in jax.tree.leaves(params)) == expected < 1_000_000
  logp = model.apply({'params': params}, jax.random.normal(jax.random.key(1), (2, 28, 28, 1)))
  assert logp.shape == (2, 10)
  np.testing.assert_allclose(np.exp(np.asarray(logp)).sum(-1), 1.0, rtol=1e-5)


def test_crop_flip_is_a_seeded_shift_and_mirror():
  images = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5, 1) + 1  # no zero pixel
  same = augment.random_crop_flip(images, np.random.default_rng(0), pad=0, flip=False)
  np.testing.assert_array_equal(same, images)
  out = augment.random_crop_flip(images, np.random.default_rng(7), pad=2, flip=True)
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_array_equal(out, augment.random_crop_flip(images, np.random.default_rng(7), pad=2, flip=True))
  for img, src in zip(out[..., 0], images[..., 0]):
    # Some shift (dy, dx) in [-2, 2]^2 of src or of its mirror reproduces img, zeros filling in.
    def shifted(a, dy, dx):
      p = np.pad(a, 2)
      return p[2 + dy:2 + dy + 5, 2 + dx:2 + dx + 5]
    assert any(np.array_equal(img, shifted(a, dy, dx)) for a in (src, src[:, ::-1])
               for dy in range(-2, 3) for dx in range(-2, 3))
  many = augment.random_crop_flip(np.repeat(images[:1], 64, 0), np.random.default_rng(1), pad=2, flip=True)
  assert len({m.tobytes() for m in many}) > 10  # crops and flips vary across the batch
  with pytest.raises(ValueError, match='pad=-1'):
    augment.random_crop_flip(images, np.random.default_rng(0), pad=-1, flip=False)
