"""The pre-activation ResNet (parameter count by hand, shapes), the one-cycle schedule, random erasing, training."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_caption import config_utils
from cnn_caption import models
from cnn_caption import train
from cnn_caption.data import augment
from cnn_caption.data import fashion_mnist
from cnn_caption.errors import UserError
from cnn_caption.models import norm
from cnn_caption.models import resnet
from cnn_caption.tasks import classification
from cnn_caption.training import optim
from cnn_caption.training import parallel
from configs import classifier as classifier_config
from conftest import jit_init
from conftest import needs_fmnist
from conftest import override


def _count(tree) -> int:
  return sum(p.size for p in jax.tree.leaves(tree))


def test_parameter_count_by_hand_and_output_shapes():
  config = classifier_config.get_config('resnet')
  model = models.create_model(config)
  widths, blocks = model.widths, model.blocks
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  # Stem 3x3x1xw0 (no bias). A block of width w from c channels: BN(c) (scale, bias), conv 3x3 c->w, BN(w),
  # conv 3x3 w->w, and a 1x1 c->w projection where c != w or it strides (the first block of stages 2+).
  expected, c = 9 * widths[0], widths[0]
  for i, (w, n) in enumerate(zip(widths, blocks)):
    for j in range(n):
      expected += 2 * c + 9 * c * w + 2 * w + 9 * w * w
      if i > 0 and j == 0:
        expected += c * w
      c = w
  expected += 2 * c + c * 10 + 10  # final BN, head
  assert _count(variables['params']) == expected <= 1_000_000
  # Evaluation statistics: a mean and a variance per BatchNorm channel, outside the parameters.
  num_bn_channels = sum(v.size for v in jax.tree.leaves(variables['params']) if v.ndim == 1) - 10  # minus head bias
  assert _count(variables[norm.STATS]) == num_bn_channels
  params = jit_init(model, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  # One compiled call gives the output and the intermediates.
  logp, inter = jax.jit(
    lambda p, v: model.apply({'params': p}, v, train=True, capture_intermediates=True, mutable=['intermediates'])
  )(params, x)
  assert logp.shape == (3, 10)
  np.testing.assert_allclose(np.exp(np.asarray(logp)).sum(-1), 1.0, rtol=1e-5)
  # Stage sizes 28 -> 14 -> 7 -> 4 (stem stride 1): the first block of each stage after the first halves the
  # size (SAME padding).
  assert model.stem_stride == 1 and len(widths) == 4
  shapes = {k: v['__call__'][0].shape for k, v in inter['intermediates'].items() if k.startswith('stage')}
  sizes = [shapes[f'stage{i + 1}_block1'][1:] for i in range(4)]
  assert sizes == [(28, 28, widths[0]), (14, 14, widths[1]), (7, 7, widths[2]), (4, 4, widths[3])]


def test_multiply_adds_by_hand():
  model = resnet.ResNet(widths=(8, 16), blocks=(1, 1), stem_stride=2)
  stem = 14 * 14 * 9 * 8
  stage1 = 14 * 14 * 9 * (8 * 8 + 8 * 8)
  stage2 = 7 * 7 * (9 * (8 * 16 + 16 * 16) + 8 * 16)
  assert model.multiply_adds() == stem + stage1 + stage2 + 16 * 10


@pytest.mark.parametrize('stride', [1, 2])
def test_conv3x3_slices_equal_lax_conv(stride):
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  slices = resnet.Conv3x3(5, stride, 'slices')
  params = slices.init(jax.random.key(1), x)
  out = slices.apply(params, x)
  assert out.shape == (2, 4 if stride == 2 else 7, 4 if stride == 2 else 7, 5)
  np.testing.assert_allclose(out, resnet.Conv3x3(5, stride, 'lax').apply(params, x), rtol=1e-5, atol=1e-5)


def test_bad_shapes_fail_in_one_line():
  with pytest.raises(UserError, match='one entry per stage'):
    resnet.ResNet(widths=(8, 16), blocks=(1,)).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_one_cycle_schedule_peak_and_end():
  opt = ml_collections.ConfigDict(
    {'learning_rate': 0.1, 'schedule': 'one_cycle', 'warmup_fraction': 0.3, 'accumulate_steps': 1}
  )
  lr_at = optim.learning_rate_at(opt, 1000)
  assert math.isclose(lr_at(0), 0.1 / 25, rel_tol=1e-5)
  assert math.isclose(lr_at(300), 0.1, rel_tol=1e-5)  # the peak, after 30% of the steps
  assert max(lr_at(s) for s in range(1000)) == pytest.approx(0.1, rel=1e-5)
  assert lr_at(150) < lr_at(299) and lr_at(700) < lr_at(301)
  assert math.isclose(lr_at(1000), 0.1 / 25 / 1e4, rel_tol=1e-3)


def test_one_cycle_fraction_is_validated():
  config = override(classifier_config.get_config('resnet'), **{'optimizer.warmup_fraction': 1.5})
  with pytest.raises(UserError, match='warmup_fraction'):
    config_utils.validate(config)


def test_random_erase_is_seeded_and_zeroes_one_rectangle():
  images = np.full((64, 28, 28, 1), 7, np.uint8)
  np.testing.assert_array_equal(augment.random_erase(images, np.random.default_rng(0), prob=0.0), images)
  out = augment.random_erase(images, np.random.default_rng(3), prob=0.5)
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_array_equal(out, augment.random_erase(images, np.random.default_rng(3), prob=0.5))
  erased = (out == 0).any(axis=(1, 2, 3))
  assert 16 < erased.sum() < 48  # about half of 64
  for img in out[erased, ..., 0]:
    rows, cols = np.nonzero(img == 0)
    box = img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert (box == 0).all() and 0.02 * 784 * 0.5 <= box.size <= 0.25 * 784 * 1.5  # one rectangle of that area
  all_erased = augment.random_erase(images, np.random.default_rng(3), prob=1.0)
  assert (all_erased == 0).any(axis=(1, 2, 3)).all()


def _smoke(**overrides):
  return override(classifier_config.get_config('resnet_smoke'), **overrides)


@needs_fmnist
def test_random_erase_in_training_batches_only(tmp_path):
  config = _smoke(**{'data.augment_pad': 0, 'data.augment_flip': False, 'data.random_erase': 1.0})
  task = classification.ClassificationTask(config, str(tmp_path), parallel.make_mesh())
  idx = np.arange(64)
  batch = task.train_batch(idx, 5)
  np.testing.assert_array_equal(batch['image'], task.train_batch(idx, 5)['image'])  # seeded by (seed, step)
  assert not np.array_equal(batch['image'], task.train_batch(idx, 6)['image'])
  plain = fashion_mnist.to_float(task.splits['train'][0][idx])
  assert ((batch['image'] == 0) & (plain != 0)).any(axis=(1, 2, 3)).sum() > 32
  off = classification.ClassificationTask(
    override(_smoke(), **{'data.augment_pad': 0, 'data.augment_flip': False, 'data.random_erase': 0.0}),
    str(tmp_path),
    parallel.make_mesh(),
  )
  np.testing.assert_array_equal(off.train_batch(idx, 5)['image'], plain)
  # Evaluation reads the images unchanged.
  np.testing.assert_array_equal(
    task._fetch('val')(slice(0, 8))['image'], fashion_mnist.to_float(task.splits['val'][0][:8])
  )
  with pytest.raises(UserError, match='random_erase'):
    classification.ClassificationTask.validate_config(_smoke(**{'data.random_erase': 1.5}))


@needs_fmnist
def test_eval_shift_and_flip_average_ten_views(tmp_path):
  config = _smoke(**{'data.num_eval': 8, 'eval_batch_size': 8, 'data.eval_flip': True, 'data.eval_shift': True})
  task = classification.ClassificationTask(config, str(tmp_path), parallel.make_mesh())
  params = jit_init(task.model, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  variables = task._variables(params)
  images, labels = task.splits['val']
  x = np.asarray(fashion_mnist.to_float(images[:8]))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  views = [x] + [padded[:, 1 - dy : 29 - dy, 1 - dx : 29 - dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
  views += [v[:, :, ::-1] for v in views]
  apply = jax.jit(task.model.apply)  # one compilation for the ten views
  p = np.mean([np.exp(apply(variables, v)) for v in views], axis=0)
  got = task.evaluate(params, 'val')
  np.testing.assert_allclose(got['loss'], -np.log(p[np.arange(8), labels[:8]]).mean(), rtol=1e-5)
  assert got['accuracy'] == np.mean(p.argmax(-1) == labels[:8])


@needs_fmnist
@pytest.mark.slow
def test_smoke_training_finishes_with_finite_metrics(tmp_path):
  results = train.train_and_evaluate(_smoke(), str(tmp_path))
  assert np.isfinite(results['test_accuracy']) and np.isfinite(results['test_loss'])
  assert 0.0 <= results['test_accuracy'] <= 1.0
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert len(history) == 2 and all(np.isfinite(r['train_loss']) for r in history)
