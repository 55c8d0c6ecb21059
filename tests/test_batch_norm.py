"""BatchNorm with population statistics recomputed from the parameters (models/norm.py) and its use in training."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from cnn_caption import train
from cnn_caption.data import fashion_mnist
from cnn_caption.errors import UserError
from cnn_caption.models import norm
from cnn_caption.tasks import classification
from cnn_caption.training import checkpoint
from cnn_caption.training import parallel
from conftest import needs_fmnist
from conftest import strong_smoke


class _Affine(nn.Module):
  """x * 3 + 1 -> BatchNorm: the second layer sees statistics that differ from the input's."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    return norm.BatchNorm(name='bn')(x * 3.0 + 1.0, train=train)


def test_training_normalises_by_the_batch_and_population_stats_are_the_datas():
  x = np.random.default_rng(0).normal(2.0, 5.0, (2, 8, 3, 3, 4)).astype(np.float32)  # two batches of 8
  model = _Affine()
  variables = model.init(jax.random.key(0), x[0, :1])
  assert set(variables) == {'params', norm.STATS} and norm.has_batch_norm(model, (x[0, :1],))
  y = np.asarray(model.apply({'params': variables['params']}, x[0], train=True))
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var((0, 1, 2)), 1.0, rtol=1e-3)  # var / (var + eps)
  # Training stores nothing: the same apply with no mutable collection.
  moments_fn = jax.jit(lambda p, b: norm.batch_moments(model, p, b))
  stats = norm.population_stats(moments_fn, variables['params'], [x[0], x[1]])[norm.STATS]['bn']
  z = x.reshape(-1, 4) * 3.0 + 1.0  # all 16 examples' inputs to the BatchNorm
  np.testing.assert_allclose(stats['mean'], z.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['var'], z.var(0), rtol=1e-4)
  # Evaluation normalises by those statistics, one image at a time as well as in a batch.
  evaluated = model.apply({'params': variables['params'], norm.STATS: {'bn': stats}}, x[1, :1], train=False)
  np.testing.assert_allclose(evaluated, (x[1, :1] * 3.0 + 1.0 - z.mean(0)) / np.sqrt(z.var(0) + 1e-5), rtol=1e-4)


def _smoke(**overrides):
  """test_strong_classifier's smoke config with BatchNorm, its statistics from the first 2 batches."""
  return strong_smoke({'data.bn_stats_examples': 64, 'model.norm': 'batch', 'steps_per_call': 1, **overrides})


@pytest.mark.slow
@needs_fmnist
def test_strong_cnn_with_batch_norm_trains_and_its_scores_follow_from_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(_smoke(), workdir)
  assert results['num_params'] > 0 and 0.0 <= results['test_accuracy'] <= 1.0
  # A fresh task re-scores the final checkpoint's parameters exactly as the run did: the BatchNorm
  # statistics are recomputed from the parameters, nothing else is needed.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  params = ckpt.restore_params(ckpt.latest_step())
  ckpt.close()
  task = classification.ClassificationTask(_smoke(), workdir, parallel.make_mesh())
  val = task.evaluate(params, 'val')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  assert val['accuracy'] == last['val_accuracy']
  np.testing.assert_allclose(val['loss'], last['val_loss'], rtol=1e-6)
  # The first BatchNorm's statistics are its input's moments over the first 64 training images (2 batches).
  stats = task._variables(params)[norm.STATS]['block1a']['norm']
  images = fashion_mnist.to_float(task.splits['train'][0][:64])
  _, inter = task.model.apply(
    {'params': params}, images, train=True, capture_intermediates=True, mutable=['intermediates']
  )
  conv_out = np.asarray(inter['intermediates']['block1a']['conv']['__call__'][0]).reshape(-1, 4)
  np.testing.assert_allclose(stats['mean'], conv_out.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], conv_out.var(0), rtol=1e-3, atol=1e-6)
  # Evaluation of one image does not depend on the others in its batch.
  variables = task._variables(params)
  x = fashion_mnist.to_float(task.splits['val'][0][:8])
  np.testing.assert_allclose(
    task.model.apply(variables, x[:1]), task.model.apply(variables, x)[:1], rtol=1e-5, atol=1e-6
  )


@pytest.mark.slow
@needs_fmnist
def test_fewer_statistics_examples_than_a_batch_stop_before_the_first_step(tmp_path):
  with pytest.raises(UserError, match=r'config.data.bn_stats_examples=10 is below one batch \(config.batch_size=32\)'):
    train.train_and_evaluate(_smoke(**{'data.bn_stats_examples': 10}), str(tmp_path))
  saved = tmp_path / 'checkpoints'
  assert not saved.exists() or not [d for d in os.listdir(saved) if d.isdigit()]
