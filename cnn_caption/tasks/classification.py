"""Fashion-MNIST classification: NLL of log-probabilities, accuracy."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cnn_caption import config_utils
from cnn_caption import io_utils
from cnn_caption import models
from cnn_caption import plots
from cnn_caption.data import augment
from cnn_caption.data import fashion_mnist
from cnn_caption.errors import UserError
from cnn_caption.models import norm
from cnn_caption.tasks import base
from cnn_caption.training import memory
from cnn_caption.training import parallel


def classification_loss(params, batch, *, apply_fn, rngs, train: bool, label_smoothing: float = 0.0):
  """Mean NLL of the labels under the model's log-probabilities.

  label_smoothing > 0 (training only): the target puts 1 - eps on the label and eps spread evenly over the
  classes (optax.smooth_labels); evaluation losses stay the plain NLL.
  """
  logp_BxK = apply_fn({'params': params}, batch['image'], train=train, rngs=rngs)
  if label_smoothing and train:
    soft_BxK = optax.smooth_labels(jax.nn.one_hot(batch['label'], logp_BxK.shape[-1]), label_smoothing)
    return -(soft_BxK * logp_BxK).sum(-1).mean(), {'logp': logp_BxK}
  nll = -jnp.take_along_axis(logp_BxK, batch['label'][:, None], axis=1).mean()
  return nll, {'logp': logp_BxK}


def _shift(x_BxHxWxC: jax.Array, dy: int, dx: int) -> jax.Array:
  """The images moved by (dy, dx) pixels, zeros filling in (as a random crop of the zero-padded image)."""
  _, h, w, _ = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return padded[:, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def _tta_log_probs(log_probs_fn, images_BxHxWxC: jax.Array, *, flip: bool, shift: bool) -> jax.Array:
  """Test-time augmentation: log mean probability over the image, 1-pixel shifts (shift), mirrors (flip)."""
  views = [images_BxHxWxC]
  if shift:
    views += [_shift(images_BxHxWxC, dy, dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
  if flip:
    views += [v[:, :, ::-1] for v in views]
  if len(views) == 1:
    return log_probs_fn(images_BxHxWxC)
  logp_VxBxK = jnp.stack([log_probs_fn(v) for v in views])
  return jax.nn.logsumexp(logp_VxBxK, axis=0) - jnp.log(float(len(views)))


_FASHION_MNIST_SHAPE = (28, 28, 1)
PREDICTIONS_FILE = 'test_predictions.npz'  # written with the final results, read by the report


class ClassificationTask(base.Task):
  """Image classification: NLL of the labels, accuracy; the homework CNN and the strong variant."""

  selection_metric = 'accuracy'

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    shape = tuple(base.get_field(config, 'model.input_shape') or _FASHION_MNIST_SHAPE)
    if shape != _FASHION_MNIST_SHAPE:
      raise UserError(
        f'config.model.input_shape={shape} does not match the Fashion-MNIST images '
        f'{_FASHION_MNIST_SHAPE}; set --config.model.input_shape="{_FASHION_MNIST_SHAPE}"'
      )
    base.check(config, 'data.augment_pad', base.nonneg_int, 'an integer >= 0 (0 = no random crops)')
    base.check(config, 'data.random_erase', lambda v: base.prob(v) or v == 1, 'a probability in [0, 1] (0 = off)')
    base.check(
      config, 'data.bn_stats_examples', base.pos_int, 'a positive integer (training images for BatchNorm statistics)'
    )
    base.check(config, 'loss.label_smoothing', base.prob, 'in [0, 1) (0 = off)')
    base.check(config, 'data.train_on_val', lambda v: isinstance(v, bool), 'True or False')
    if base.get_field(config, 'data.train_on_val') and base.get_field(config, 'early_stopping_patience'):
      raise UserError(
        'config.data.train_on_val=True trains on the val images, so val cannot stop training early; set '
        '--config.early_stopping_patience=0 or --config.data.train_on_val=False'
      )
    if base.get_field(config, 'data.train_on_val') and base.get_field(config, 'sweep.learning_rates'):
      raise UserError(
        'config.data.train_on_val=True trains on the val images, so val cannot choose the learning rate; '
        'sweep with --config.data.train_on_val=False, then train the chosen rate on all images'
      )

  # Static for the benchmarks and tests that use the class itself; an instance binds config.loss.label_smoothing.
  loss = staticmethod(classification_loss)

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh):
    del workdir
    self.config, self.mesh = config, mesh
    self.splits = fashion_mnist.load_splits(
      config.data.dir,
      config.data.num_train,
      config.data.num_eval,
      config.model.num_classes,
      train_on_val=config.data.get('train_on_val', False),
    )
    self.model = models.create_model(config)
    if not config.get('log_grad_norm', True):
      self.metrics = self.loss_metrics
    self.num_train = len(self.splits['train'][1])
    parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
    # config.eval_xla_options: XLA options for the evaluation and prediction programs (not the train step).
    self._eval_options = config_utils.compiler_options(config, 'eval_xla_options')
    self._eval_fn = memory.CheckedJit(
      self._eval_counts,
      knob='eval_batch_size',
      value=config.eval_batch_size,
      what='evaluation',
      compiler_options=self._eval_options,
    )
    self._batch_norm = norm.has_batch_norm(self.model, self.example_inputs())
    self._moments_fn = jax.jit(functools.partial(norm.batch_moments, self.model), compiler_options=self._eval_options)
    self._predict_fn = None  # jitted at the first predict
    self.loss = functools.partial(
      classification_loss, label_smoothing=config.get('loss', {}).get('label_smoothing', 0.0)
    )

  def example_inputs(self) -> tuple:
    return models.example_inputs(self.config)

  def train_batch(self, indices: np.ndarray, step: int, params=None) -> dict[str, np.ndarray]:
    del params  # off-policy: batches do not depend on the model
    images, labels = self.splits['train']
    x = images[indices]
    data = self.config.data
    pad, flip, erase = data.get('augment_pad', 0), data.get('augment_flip', False), data.get('random_erase', 0.0)
    if pad or flip or erase:
      # One generator per step, seeded by (seed, step): the same crops after a resume, whatever the chunking.
      b = self.config.batch_size
      chunks = []
      for i in range(0, len(x), b):
        rng = np.random.default_rng([self.config.seed, step + i // b])
        chunk = augment.random_crop_flip(x[i : i + b], rng, pad=pad, flip=flip)
        chunks.append(augment.random_erase(chunk, rng, prob=erase))
      x = np.concatenate(chunks)
    return {'image': fashion_mnist.to_float(x), 'label': labels[indices]}

  @staticmethod
  def metrics(loss, aux, grads) -> dict:
    del aux
    return {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  @staticmethod
  def loss_metrics(loss, aux, grads) -> dict:
    """metrics without the gradient norm (config.log_grad_norm=False): one pass less over the gradients."""
    del aux, grads
    return {'loss': loss}

  def _variables(self, params) -> dict:
    """What evaluation applies the model to: the parameters, and BatchNorm's population statistics if any.

    The statistics are recomputed from the parameters each time (models/norm.py): training batches of
    config.batch_size over the first config.data.bn_stats_examples training images, unaugmented.
    """
    if not self._batch_norm:
      return {'params': params}
    images = self.splits['train'][0]
    b = self.config.batch_size
    n = min(self.config.data.get('bn_stats_examples', 10_000), len(images)) // b * b
    if n == 0:
      raise UserError(
        f'config.data.bn_stats_examples={self.config.data.get("bn_stats_examples")} is below one batch '
        f'(config.batch_size={b}); BatchNorm needs at least one training batch for its statistics'
      )
    batches = (
      parallel.shard_batch({'image': fashion_mnist.to_float(images[i : i + b])}, self.mesh)['image']
      for i in range(0, n, b)
    )
    return {'params': params, **norm.population_stats(self._moments_fn, params, batches)}

  def _log_probs(self, variables, images):
    """Log-probabilities for evaluation, with the configured test-time augmentation (flips, 1-pixel shifts)."""
    return _tta_log_probs(
      lambda x: self.model.apply(variables, x, train=False),
      images,
      flip=self.config.data.get('eval_flip', False),
      shift=self.config.data.get('eval_shift', False),
    )

  def _eval_counts(self, variables, batch):
    logp = self._log_probs(variables, batch['image'])
    labels, mask = batch['label'], batch['mask']
    correct = (jnp.argmax(logp, -1) == labels) & mask
    nll = -jnp.take_along_axis(logp, labels[:, None], 1)[:, 0]
    return correct.sum(), jnp.where(mask, nll, 0.0).sum()

  def _fetch(self, split: str):
    images, labels = self.splits[split]
    return lambda rows: {'image': fashion_mnist.to_float(images[rows]), 'label': labels[rows]}

  def check_memory(self, params) -> None:
    """Compiles evaluation for config.eval_batch_size and stops with one line if a call cannot fit."""
    b = self.config.eval_batch_size
    example = {**self._fetch('val')(slice(0, 1)), 'mask': np.ones(1, bool)}
    self._eval_fn.check(
      self._variables(params),
      parallel.abstract_batch(example, b, self.mesh),
      host_bytes=b * sum(v[0].nbytes for v in example.values()),
    )

  def evaluate(self, params, split: str) -> dict[str, float]:
    labels = self.splits[split][1]
    fetch = self._fetch(split)
    correct, nll = 0, 0.0
    variables = self._variables(params)
    for batch, _ in parallel.padded_batches(len(labels), self.config.eval_batch_size, fetch):
      c, batch_nll = self._eval_fn(variables, parallel.shard_batch(batch, self.mesh))
      correct += int(c)
      nll += float(batch_nll)
    return {'accuracy': correct / len(labels), 'loss': nll / len(labels)}

  def save_assets(self, workdir: str) -> None:
    del workdir

  def _predictions(self, variables, images):
    logp = self._log_probs(variables, images)
    return jnp.argmax(logp, -1), jnp.exp(jnp.max(logp, -1))

  def predict(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The predicted class of every image of a split and its probability (as evaluate scores them)."""
    if self._predict_fn is None:
      self._predict_fn = jax.jit(
        self._predictions, out_shardings=parallel.replicated(self.mesh), compiler_options=self._eval_options
      )
    images = self.splits[split][0]
    fetch = lambda rows: {'image': fashion_mnist.to_float(images[rows])}
    variables = self._variables(params)
    preds, probs = [], []
    for batch, n in parallel.padded_batches(len(images), self.config.eval_batch_size, fetch):
      pred, prob = self._predict_fn(variables, parallel.shard_batch({'image': batch['image']}, self.mesh)['image'])
      preds.append(np.asarray(pred)[:n])
      probs.append(np.asarray(prob, np.float32)[:n])
    return np.concatenate(preds).astype(np.int32), np.concatenate(probs)

  def save_predictions(self, params, workdir: str, num_mistakes: int = 30) -> None:
    """workdir/test_predictions.npz: per test image its label, prediction and the prediction's probability.

    Also the images of the num_mistakes most confident mistakes (`mistake_index` into the test split,
    `mistake_image` uint8), so the report needs no data set.
    """
    pred, prob = self.predict(params, 'test')
    images, labels = self.splits['test']
    wrong = np.flatnonzero(pred != labels)
    worst = wrong[np.argsort(-prob[wrong], kind='stable')][:num_mistakes]
    arrays = {
      'label': labels.astype(np.int32),
      'pred': pred,
      'prob': prob,
      'mistake_index': worst.astype(np.int32),
      'mistake_image': images[worst, :, :, 0],
      'class_names': np.array(fashion_mnist.CLASS_NAMES[: self.config.model.num_classes]),
    }
    if parallel.is_main_process():
      io_utils.atomic_write(os.path.join(workdir, PREDICTIONS_FILE), lambda f: np.savez_compressed(f, **arrays))

  def final_results(self, params, best_params, workdir: str) -> dict:
    test = self.evaluate(params, 'test')
    self.save_predictions(params, workdir)  # the parameters whose test_accuracy is reported
    test_best = self.evaluate(best_params, 'test')
    return {
      'test_accuracy': test['accuracy'],
      'test_loss': test['loss'],
      'test_accuracy_at_best_epoch': test_best['accuracy'],
      'num_train': self.num_train,
      'num_val': len(self.splits['val'][1]),
      'num_test': len(self.splits['test'][1]),
      'val_held_out': not self.config.data.get('train_on_val', False),  # False: val images were trained on
    }

  def tensorboard_images(self, params) -> dict[str, np.ndarray]:
    """The learned convolution kernels as RGB mosaics."""
    return {
      f'filters/{layer}': plots.filter_image(np.asarray(params[layer]['kernel']))
      for layer in ('conv1', 'conv2')
      if layer in params
    }

  def make_plots(self, history: list[dict], params, workdir: str) -> None:
    plot_dir = os.path.join(workdir, 'plots')
    plots.plot_curves(
      {'train': [r['train_loss'] for r in history]},
      'training loss (epoch mean)',
      os.path.join(plot_dir, 'train_loss.png'),
    )
    plots.plot_curves(
      {'validation': [r['val_accuracy'] for r in history]},
      'validation accuracy',
      os.path.join(plot_dir, 'val_accuracy.png'),
    )
    for layer in ('conv1', 'conv2'):
      if layer in params:
        plots.plot_filters(
          np.asarray(params[layer]['kernel']),
          os.path.join(plot_dir, f'filters_{layer}.png'),
          f'{layer} kernels (rows: output channels, cols: input channels)',
        )
