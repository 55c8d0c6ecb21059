"""Add a task: least-squares regression of y = sin(3x) from x, trained and checkpointed by the generic Trainer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_caption.tasks import base
from configs import classifier


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x_Bx1: jax.Array, *, train: bool = False) -> jax.Array:
    return nn.Dense(1)(nn.tanh(nn.Dense(self.hidden)(x_Bx1)))


class RegressionTask(base.Task):
  selection_metric = 'neg_mse'  # higher is better

  def __init__(self, config, workdir, mesh):
    rng = np.random.default_rng(config.seed)
    self.data = {}
    for split, n in (('train', 512), ('val', 128), ('test', 128)):
      x = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
      self.data[split] = {'x': x, 'y': np.sin(3 * x)}
    self.model, self.num_train = MLP(config.model.hidden), 512

  def example_inputs(self):
    return (jnp.zeros((1, 1)),)

  def train_batch(self, indices, step, params=None):
    return {k: v[indices] for k, v in self.data['train'].items()}

  def loss(self, params, batch, *, apply_fn, rngs, train):
    return jnp.mean((apply_fn({'params': params}, batch['x']) - batch['y']) ** 2), {}

  def evaluate(self, params, split):
    batch = self.data[split]
    return {'neg_mse': -float(self.loss(params, batch, apply_fn=self.model.apply, rngs={}, train=False)[0])}


def get_config(arg=None):
  config = classifier.get_config(arg)  # optimizer, checkpoints, logging: the classifier's fields
  config.task = 'examples.regression:RegressionTask'
  config.model = dict(name='regression_mlp', hidden=64)
  config.optimizer.update(name='adam', learning_rate=1e-2)
  config.update(batch_size=32, num_epochs=5, steps_per_call=4)
  return config
