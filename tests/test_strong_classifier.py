"""The strong Fashion-MNIST CNN (parameter count by hand, shapes), the host augmentation and its exact resume."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption import models
from cnn_caption import train
from cnn_caption.data import augment
from cnn_caption.data import fashion_mnist
from cnn_caption.errors import UserError
from cnn_caption.models import strong_classifier
from cnn_caption.tasks import classification
from cnn_caption.training import checkpoint
from cnn_caption.training import parallel
from configs import classifier as classifier_config
from conftest import jit_init
from conftest import needs_fmnist
from conftest import override
from conftest import strong_smoke


def _strong_model(**overrides):
  return models.create_model(classifier_config.get_config('strong'), **overrides)


def test_parameter_count_by_hand_and_output():
  model = _strong_model()
  assert (model.space_to_depth, model.channels, model.convs_per_stage, model.hidden) == (2, (96, 192), (1, 1), 256)
  x = jnp.zeros((2, 28, 28, 1))
  params = jit_init(model, jax.random.key(0), x)['params']
  # 28x28x1 -> space-to-depth 14x14x4 -> conv 96, pool -> 7x7 -> conv 192, pool (SAME) -> 4x4x192 = 3072
  # -> fc 256 -> head 10. A 3x3 conv with bias: 9*cin*cout + cout; a dense layer: din*dout + dout.
  expected = (9 * 4 * 96 + 96) + (9 * 96 * 192 + 192) + (4 * 4 * 192 * 256 + 256) + (256 * 10 + 10)
  assert sum(p.size for p in jax.tree.leaves(params)) == expected < 1_000_000
  logp = model.apply({'params': params}, jax.random.normal(jax.random.key(1), (2, 28, 28, 1)))
  assert logp.shape == (2, 10)
  np.testing.assert_allclose(np.exp(np.asarray(logp)).sum(-1), 1.0, rtol=1e-5)


def test_space_to_depth_and_same_pooling():
  # Space-to-depth puts each 2x2 block's pixels, row-major, into the channels of one position.
  model = strong_classifier.StrongCNN(channels=(1,), convs_per_stage=(0,), hidden=1, space_to_depth=2)
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  s2d = model.apply({}, x, method=lambda m, v: m._space_to_depth(v))
  np.testing.assert_array_equal(s2d[0, 0, 1], [2.0, 3.0, 6.0, 7.0])
  # On ReLU outputs (>= 0), the zero-padded reshape-and-max pool equals nn.max_pool with SAME padding.
  y = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 7, 7, 3)))
  for pool in ('reshape_max', 'max'):
    pooled = strong_classifier.StrongCNN(pool=pool).apply({}, y, method=lambda m, v: m._pool(v))
    np.testing.assert_array_equal(pooled, nn.max_pool(y, (2, 2), strides=(2, 2), padding='SAME'))


@pytest.mark.slow
@needs_fmnist
def test_eval_flip_averages_the_probabilities_of_the_mirror(tmp_path):
  config = _strong_smoke(**{'data.num_eval': 8, 'eval_batch_size': 8})
  task = classification.ClassificationTask(config, str(tmp_path), parallel.make_mesh())
  params = jit_init(task.model, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  images, labels = task.splits['val']
  x = fashion_mnist.to_float(images[:8])
  p = np.exp(task.model.apply({'params': params}, x)) + np.exp(task.model.apply({'params': params}, x[:, :, ::-1]))
  expected_nll = -np.log(p[np.arange(8), labels[:8]] / 2).mean()
  flip_task = classification.ClassificationTask(
    override(config, **{'data.eval_flip': True}), str(tmp_path), parallel.make_mesh()
  )
  got = flip_task.evaluate(params, 'val')
  np.testing.assert_allclose(got['loss'], expected_nll, rtol=1e-5)
  assert got['accuracy'] == np.mean(p.argmax(-1) == labels[:8])


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
  return strong_smoke(overrides)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['none', 'group', 'batch'])
def test_jitted_gradient_is_finite(norm):
  # Regression: with the reshape-and-max pool behind GroupNorm the jitted gradient was NaN (see the module doc).
  model = _strong_model(
    channels=(4, 8), hidden=8, norm=norm, groups=2, pool='max' if norm == 'group' else 'reshape_max'
  )
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
  params = jit_init(model, jax.random.key(1), x[:1])['params']
  grads = jax.jit(jax.grad(lambda p: model.apply({'params': p}, x, train=True).sum()))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_bad_shape_settings_are_one_line_config_errors():
  x = jnp.zeros((1, 28, 28, 1))
  cases = [
    ({'norm': 'group', 'pool': 'reshape_max'}, "norm='group' needs config.model.pool='max'"),
    ({'norm': 'layer'}, "config.model.norm='layer' is unknown: use 'none', 'group' or 'batch'"),
    ({'channels': (8, 16), 'convs_per_stage': (1,)}, 'must have one entry per stage'),
    ({'space_to_depth': 3}, 'space_to_depth=3 does not divide the image size 28x28'),
    ({'pool': 'avg'}, "config.model.pool='avg' is unknown"),
  ]
  for fields, message in cases:
    with pytest.raises(UserError, match=message):
      jax.eval_shape(strong_classifier.StrongCNN(**fields).init, jax.random.key(0), x)


def test_label_smoothing_loss_against_numpy_and_only_in_training():
  model = _strong_model(channels=(4, 8), hidden=8)
  x = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
  labels = np.array([0, 3, 9, 9, 1, 4], np.int32)
  params = jit_init(model, jax.random.key(1), x[:1])['params']
  batch = {'image': x, 'label': labels}
  logp = np.asarray(model.apply({'params': params}, x), np.float64)
  nll = -logp[np.arange(6), labels]
  eps = 0.1
  # (1 - eps) on the label plus eps / K on every class: (1 - eps) * NLL + eps * mean over classes of -log p.
  want = ((1 - eps) * nll + eps * -logp.mean(-1)).mean()
  kwargs = {'apply_fn': model.apply, 'rngs': {'dropout': jax.random.key(2)}}
  smoothed, _ = classification.classification_loss(params, batch, train=True, label_smoothing=eps, **kwargs)
  np.testing.assert_allclose(float(smoothed), want, rtol=1e-5)
  plain, _ = classification.classification_loss(params, batch, train=False, label_smoothing=eps, **kwargs)
  np.testing.assert_allclose(float(plain), nll.mean(), rtol=1e-5)
  assert abs(float(smoothed) - float(plain)) > 1e-3  # the two differ here, so the checks above tell them apart


@needs_fmnist
def test_config_label_smoothing_reaches_the_task_loss(tmp_path):
  config = _strong_smoke(**{'loss.label_smoothing': 0.2})
  task = classification.ClassificationTask(config, str(tmp_path), parallel.make_mesh())
  assert task.loss.keywords == {'label_smoothing': 0.2}
  assert classification.ClassificationTask.loss is classification.classification_loss  # the class: no smoothing
