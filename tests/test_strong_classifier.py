"""The strong Fashion-MNIST CNN (parameter count by hand, shapes), the host augmentation and its exact resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption import checkpoint
from cnn_caption import parallel
from cnn_caption import train
from cnn_caption.data import augment
from cnn_caption.data import fashion_mnist
from cnn_caption.models import strong_classifier
from cnn_caption.tasks import classification
from configs import classifier as classifier_config
from conftest import needs_fmnist
from conftest import override


def test_parameter_count_by_hand_and_output():
  model = strong_classifier.StrongCNN(channels=(32, 64, 128), groups=8)
  x = jnp.zeros((2, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  # conv (no bias) 3*3*cin*cout + GroupNorm scale and bias 2*cout per block; head 128*10 + 10.
  expected = (
    (9 * 1 * 32 + 64)
    + (9 * 32 * 32 + 64)
    + (9 * 32 * 64 + 128)
    + (9 * 64 * 64 + 128)
    + (9 * 64 * 128 + 256)
    + (128 * 10 + 10)
  )
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
      return p[2 + dy : 2 + dy + 5, 2 + dx : 2 + dx + 5]

    assert any(
      np.array_equal(img, shifted(a, dy, dx)) for a in (src, src[:, ::-1]) for dy in range(-2, 3) for dx in range(-2, 3)
    )
  many = augment.random_crop_flip(np.repeat(images[:1], 64, 0), np.random.default_rng(1), pad=2, flip=True)
  assert len({m.tobytes() for m in many}) > 10  # crops and flips vary across the batch
  with pytest.raises(ValueError, match='pad=-1'):
    augment.random_crop_flip(images, np.random.default_rng(0), pad=-1, flip=False)


def _strong_smoke(**overrides):
  config = classifier_config.get_config('strong')
  fields = {
    'data.num_train': 96,
    'data.num_eval': 64,
    'eval_batch_size': 64,
    'batch_size': 32,
    'num_epochs': 2,
    'model.channels': (4, 8, 8),
    'model.groups': 2,
    'optimizer.schedule': 'constant',
    'log_every_steps': 3,
    'steps_per_call': 2,
  }
  fields.update(overrides)
  return override(config, **fields)


@needs_fmnist
def test_augmented_batches_are_seeded_by_step_and_resume_is_exact(tmp_path):
  task = classification.ClassificationTask(_strong_smoke(), str(tmp_path), parallel.make_mesh())
  idx = np.arange(64)
  batch = task.train_batch(idx, 5)
  np.testing.assert_array_equal(batch['image'], task.train_batch(idx, 5)['image'])
  assert not np.array_equal(batch['image'], task.train_batch(idx, 6)['image'])
  # Steps 5 and 6 in one call draw what they draw in two calls (resume may split calls differently).
  np.testing.assert_array_equal(batch['image'][32:], task.train_batch(idx[32:], 6)['image'])
  plain = fashion_mnist.to_float(task.splits['train'][0][idx])
  assert not np.array_equal(batch['image'], plain)
  # Resume (2 steps per call, 3 steps an epoch: calls split differently after the restart) == uninterrupted.
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  train.train_and_evaluate(_strong_smoke(), full)
  train.train_and_evaluate(_strong_smoke(num_epochs=1), part)
  train.train_and_evaluate(_strong_smoke(), part)
  for a, b in zip(*(jax.tree.leaves(_final_params(w)) for w in (full, part))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _final_params(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  params = ckpt.restore_params(ckpt.latest_step())
  ckpt.close()
  return params


def test_jitted_gradient_is_finite():
  # Regression: with classifier.max_pool_2x2 in this model the jitted gradient was NaN (see the module doc).
  model = strong_classifier.StrongCNN(channels=(4, 8, 8), groups=2)
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(1), x[:1])['params']
  grads = jax.jit(jax.grad(lambda p: model.apply({'params': p}, x).sum()))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
