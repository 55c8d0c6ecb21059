"""Tasks: loss, metrics, data and evaluation per problem. The only model-specific part of training."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cnn_caption import models
from cnn_caption import plots
from cnn_caption import train as train_lib
from cnn_caption.data import fashion_mnist
from cnn_caption.errors import UserError


class ClassificationTask:
  """Fashion-MNIST classification: NLL of log-probabilities, accuracy."""

  selection_metric = 'accuracy'

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.splits = fashion_mnist.load_splits(config.data.dir, config.data.num_train, config.data.num_eval)
    self.model = models.create_model(config)
    self.num_train = len(self.splits['train'][1])
    self.mesh = train_lib.make_mesh()
    train_lib.check_batch_size(config.eval_batch_size, 'eval_batch_size')
    self._eval_fn = jax.jit(self._eval_counts)

  def example_inputs(self) -> tuple:
    return models.example_inputs(self.config)

  def train_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images, labels = self.splits['train']
    return {'image': fashion_mnist.to_float(images[indices]), 'label': labels[indices]}

  @staticmethod
  def loss(params, batch, *, apply_fn, rngs, train: bool):
    logp_BxK = apply_fn({'params': params}, batch['image'], train=train, rngs=rngs)
    nll = -jnp.take_along_axis(logp_BxK, batch['label'][:, None], axis=1).mean()
    return nll, {'logp': logp_BxK}

  @staticmethod
  def metrics(loss, aux, grads) -> dict:
    del aux
    return {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  def _eval_counts(self, params, images, labels, mask):
    logp = self.model.apply({'params': params}, images, train=False)
    correct = (jnp.argmax(logp, -1) == labels) & mask
    nll = -jnp.take_along_axis(logp, labels[:, None], 1)[:, 0]
    return correct.sum(), jnp.where(mask, nll, 0.0).sum()

  def evaluate(self, params, split: str) -> dict[str, float]:
    images, labels = self.splits[split]
    b, n = self.config.eval_batch_size, len(labels)
    correct, nll = 0, 0.0
    for start in range(0, n, b):
      x, y = fashion_mnist.to_float(images[start:start + b]), labels[start:start + b]
      pad = b - len(y)
      mask = np.arange(b) < len(y)
      if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
      batch = train_lib.shard_batch({'x': x, 'y': y, 'm': mask}, self.mesh)
      c, l = self._eval_fn(params, batch['x'], batch['y'], batch['m'])
      correct += int(c)
      nll += float(l)
    return {'accuracy': correct / n, 'loss': nll / n}

  def save_assets(self, workdir: str) -> None:
    del workdir

  def final_results(self, params, best_params, workdir: str) -> dict:
    del workdir
    test = self.evaluate(params, 'test')
    test_best = self.evaluate(best_params, 'test')
    return {'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
            'test_accuracy_at_best_epoch': test_best['accuracy'],
            'num_train': self.num_train, 'num_val': len(self.splits['val'][1]),
            'num_test': len(self.splits['test'][1])}

  def make_plots(self, history: list[dict], params, workdir: str) -> None:
    plot_dir = os.path.join(workdir, 'plots')
    plots.plot_curves({'train': [r['train_loss'] for r in history]}, 'training loss (epoch mean)',
                      os.path.join(plot_dir, 'train_loss.png'))
    plots.plot_curves({'validation': [r['val_accuracy'] for r in history]}, 'validation accuracy',
                      os.path.join(plot_dir, 'val_accuracy.png'))
    for layer in ('conv1', 'conv2'):
      if layer in params:
        plots.plot_filters(np.asarray(params[layer]['kernel']), os.path.join(plot_dir, f'filters_{layer}.png'),
                           f'{layer} kernels (rows: output channels, cols: input channels)')


_TASKS = {'classification': ClassificationTask}


def get_task(config: ml_collections.ConfigDict, workdir: str):
  if config.task == 'captioning':
    from cnn_caption import captioning  # pylint: disable=g-import-not-at-top
    return captioning.CaptioningTask(config, workdir)
  if config.task not in _TASKS:
    raise UserError(f'config.task={config.task!r} is unknown; use one of {sorted(_TASKS) + ["captioning"]}')
  return _TASKS[config.task](config, workdir)
