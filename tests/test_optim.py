"""Gradient accumulation: k micro-batches give the update of one batch k times larger."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from cnn_caption import train
from cnn_caption.tasks.classification import ClassificationTask
from cnn_caption.training import optim
from configs import classifier as classifier_config


class TinyClassifier(nn.Module):
  """A small stand-in with the classifier's interface (log-probabilities; no dropout): compiles fast."""

  @nn.compact
  def __call__(self, image_BxHxWxC, train: bool = False):
    del train
    hidden_BxD = nn.relu(nn.Dense(16)(image_BxHxWxC.reshape(image_BxHxWxC.shape[0], -1)))
    return nn.log_softmax(nn.Dense(10)(hidden_BxD))


def run(config, images, labels, batch_size):
  """Plain SGD over the rows in order, batch_size rows a step; the parameters after every step."""
  tx = optim.make_optimizer(config.optimizer, total_steps=len(labels) // batch_size)
  state = train.create_train_state(TinyClassifier(), (images[:1],), jax.random.key(0), tx)
  step = jax.jit(functools.partial(train.train_step, task=ClassificationTask))
  params = [state.params]
  for start in range(0, len(labels), batch_size):
    batch = {'image': images[start : start + batch_size], 'label': labels[start : start + batch_size]}
    state, _ = step(state, batch, jax.random.key(1))
    params.append(state.params)
  return params


def assert_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_accumulated_micro_batches_equal_one_big_batch():
  k = 3
  config = classifier_config.get_config('smoke')
  config.optimizer.learning_rate = 0.1
  rng = np.random.default_rng(0)
  images = rng.random((2 * 4 * k, 8, 8, 1), dtype=np.float32)
  labels = rng.integers(0, 10, size=2 * 4 * k).astype(np.int32)
  big = run(config, images, labels, batch_size=4 * k)  # two updates of 4k rows
  config.optimizer.accumulate_steps = k
  micro = run(config, images, labels, batch_size=4)  # 2k micro-steps of 4 rows
  assert_close(micro[k - 1], big[0], rtol=0, atol=0)  # no update before the k-th micro-batch
  assert_close(micro[k], big[1], rtol=1e-5, atol=2e-6)
  assert_close(micro[2 * k], big[2], rtol=1e-5, atol=2e-6)
  with pytest.raises(AssertionError):  # and it is not what plain micro-batch SGD gives
    config.optimizer.accumulate_steps = 1
    assert_close(run(config, images, labels, batch_size=4)[k], big[1], rtol=1e-5, atol=2e-6)


def test_learning_rate_schedule_counts_updates():
  config = classifier_config.get_config('smoke')
  config.optimizer.schedule = 'cosine'
  config.optimizer.accumulate_steps = 4
  lr_at = optim.learning_rate_at(config.optimizer, total_steps=40)  # 10 updates
  assert lr_at(0) == lr_at(3) == pytest.approx(0.01)
  assert lr_at(20) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 5 / 10)))
  assert lr_at(40) == pytest.approx(0.0, abs=1e-9)
