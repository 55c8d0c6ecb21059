"""The homework's Fashion-MNIST CNN and its data split."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_caption import models
from cnn_caption import tasks
from cnn_caption import train
from cnn_caption.data import fashion_mnist
from cnn_caption.errors import UserError
from cnn_caption.models import classifier
from cnn_caption.training import optim
from configs import classifier as classifier_config
from conftest import jit_init
from conftest import needs_fmnist
from conftest import override
from conftest import ROOT


def _params(config):
  model = models.create_model(config)
  return model, jit_init(model, jax.random.key(0), *models.example_inputs(config))['params']


def test_parameter_count_by_hand():
  conv1 = 3 * 3 * 1 * 16 + 16
  conv2 = 3 * 3 * 16 * 32 + 32
  flat = 32 * 6 * 6  # 28 same -> pool 14 -> 3x3 valid 12 -> pool 6
  assert flat == 1152
  fc = (flat * 600 + 600) + (600 * 120 + 120) + (120 * 10 + 10)
  expected = conv1 + conv2 + fc
  assert expected == 769_930
  _, params = _params(classifier_config.get_config())
  assert sum(p.size for p in jax.tree.leaves(params)) == expected
  assert params['fc1']['kernel'].shape == (1152, 600)


def test_output_is_log_probabilities():
  config = classifier_config.get_config()
  model, params = _params(config)
  x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
  logp = model.apply({'params': params}, x, train=False)
  assert logp.shape == (5, 10)
  np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, rtol=1e-5)


def test_dropout_only_in_training():
  config = classifier_config.get_config()
  model, params = _params(config)
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  a = model.apply({'params': params}, x, train=False)
  b = model.apply({'params': params}, x, train=False)
  np.testing.assert_array_equal(a, b)
  c = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, c)


def test_max_pool_matches_flax():
  x = jax.random.normal(jax.random.key(0), (2, 13, 12, 3))
  import flax.linen as nn

  np.testing.assert_array_equal(classifier.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


@pytest.mark.slow
def test_conv1_as_matmul_is_the_same_convolution():
  """The opt-in conv1 (9 shifted slices + a matmul) has nn.Conv's parameters and computes the same function."""
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  conv, slices = classifier.FashionCNN(), classifier.FashionCNN(conv1_as_matmul=True)
  params = jit_init(conv, jax.random.key(1), x)['params']
  assert jax.tree.map(jnp.shape, slices.init(jax.random.key(1), x)['params']) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(slices.apply({'params': params}, x), conv.apply({'params': params}, x), atol=1e-5)
  grad = lambda m: jax.grad(lambda p: m.apply({'params': p}, x).sum())(params)['conv1']['kernel']
  np.testing.assert_allclose(grad(slices), grad(conv), rtol=1e-4, atol=1e-4)
  # A kernel that is one tap (centre, channel 0 -> filter 5) copies the image into filter 5 and nothing else.
  tap = jnp.zeros((3, 3, 1, 16)).at[1, 1, 0, 5].set(1.0)
  out = classifier.ShiftedSlicesConv3x3(16).apply({'params': {'kernel': tap, 'bias': jnp.zeros(16)}}, x)
  np.testing.assert_array_equal(out[..., 5], x[..., 0])
  assert not jnp.any(out.at[..., 5].set(0.0))


def test_fast_layers_compute_the_same_function_and_gradients():
  """fast_layers is the original model up to rounding: same parameters, outputs and gradients.

  (conv1 as 9 multiply-adds, ReLU + pool with a written-out backward, outer-product kernel gradients.)
  """
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  exact, fast = classifier.FashionCNN(), classifier.FashionCNN(fast_layers=True)
  params = jit_init(exact, jax.random.key(1), x)['params']
  assert jax.tree.map(jnp.shape, fast.init(jax.random.key(1), x)['params']) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(fast.apply({'params': params}, x), exact.apply({'params': params}, x), atol=1e-5)
  grad = lambda m: jax.grad(lambda p: m.apply({'params': p}, x)[:, 3].sum())(params)  # noqa: E731
  for name, (g_fast, g_exact) in zip(
    ('/'.join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]),
    zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(exact)), strict=True),
    strict=True,
  ):
    np.testing.assert_allclose(g_fast, g_exact, rtol=1e-4, atol=1e-6, err_msg=name)


def test_small_batch_dense_is_nn_dense_with_an_outer_product_kernel_gradient():
  """SmallBatchDense: nn.Dense's parameters (bit for bit), outputs and gradients; by hand at two rows."""
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (5, 7))
  ref, small = nn.Dense(3), classifier.SmallBatchDense(3)
  params = ref.init(jax.random.key(1), x)['params']
  jax.tree.map(np.testing.assert_array_equal, small.init(jax.random.key(1), x)['params'], params)
  for rows in (5, classifier.OUTER_GRAD_MAX_ROWS + 4):  # the outer-product form and the plain matmul
    xs = jax.random.normal(jax.random.key(rows), (rows, 7))
    np.testing.assert_allclose(small.apply({'params': params}, xs), ref.apply({'params': params}, xs), atol=1e-6)
    g_small, g_ref = (
      jax.grad(lambda p, x, m=m: (m.apply({'params': p}, x) ** 2).sum(), argnums=(0, 1))(params, xs)
      for m in (small, ref)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_small, g_ref)
  # Two rows, upstream gradient dy: the kernel gradient is x[0] (x) dy[0] + x[1] (x) dy[1], the input gradient dy @ k.T.
  x2 = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  k = jnp.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]])
  dy = jnp.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
  _, vjp = jax.vjp(classifier.dense_outer_grad, x2, k)
  dx, dk = vjp(dy)
  np.testing.assert_array_equal(dk, [[7.0, 3.0, -1.0], [0.0, -1.0, -2.0]])
  np.testing.assert_array_equal(dx, [[-1.0, -1.0], [2.0, -1.0]])


def test_one_channel_conv_by_hand():
  """One tap (row 0, column 2 -> filter 1) shifts the image by (+1, -1) with zero fill.

  Its kernel gradient against an all-ones upstream gradient is the sum of the pixels that tap reads.
  """
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  tap = jnp.zeros((3, 3, 1, 2)).at[0, 2, 0, 1].set(1.0)
  out = classifier.conv3x3_one_channel(x, tap)
  expected = jnp.zeros((4, 4)).at[1:, :3].set(x[0, :3, 1:, 0])
  np.testing.assert_array_equal(out[0, :, :, 1], expected)
  assert not jnp.any(out[..., 0])
  dkernel = jax.grad(lambda k: classifier.conv3x3_one_channel(x, k).sum())(tap)
  assert float(dkernel[0, 2, 0, 1]) == float(expected.sum())  # pixels at rows 0..2, columns 1..3
  assert float(dkernel[1, 1, 0, 0]) == float(x.sum())  # the centre tap reads every pixel


def test_relu_max_pool_gradient_by_hand():
  """The gradient reaches only each window's positive maximum; a window of negatives passes none."""
  x = jnp.array([[1.0, 3.0, -1.0, -2.0], [2.0, 0.5, -3.0, -4.0]]).reshape(1, 2, 4, 1)
  y = classifier.relu_max_pool_2x2(x)
  np.testing.assert_array_equal(y.ravel(), [3.0, 0.0])
  g = jax.grad(lambda v: (classifier.relu_max_pool_2x2(v) * jnp.array([10.0, 7.0]).reshape(1, 1, 2, 1)).sum())(x)
  np.testing.assert_array_equal(g.ravel(), [0, 10, 0, 0, 0, 0, 0, 0])


def test_grad_norm_logging_is_a_switch():
  from cnn_caption.tasks import classification as tasks

  grads = {'w': jnp.array([3.0, 4.0])}
  assert set(tasks.ClassificationTask.metrics(1.0, None, grads)) == {'loss', 'grad_norm'}
  assert set(tasks.ClassificationTask.loss_metrics(1.0, None, grads)) == {'loss'}
  assert float(tasks.ClassificationTask.metrics(1.0, None, grads)['grad_norm']) == 5.0


@pytest.mark.slow
def test_loss_falls_when_one_batch_is_overfit():
  from cnn_caption.tasks import classification as tasks

  config = classifier_config.get_config()
  config.model.dropout = 0.0
  config.optimizer.learning_rate = 0.05
  model = models.create_model(config)
  state = train.create_train_state(
    model, models.example_inputs(config), jax.random.key(0), optim.make_optimizer(config.optimizer, 100)
  )
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((1, 8, 28, 28, 1), np.float32), 'label': rng.integers(0, 10, (1, 8)).astype(np.int32)}
  task = tasks.ClassificationTask  # loss and metrics are static methods: no data needed
  step = jax.jit(lambda s, b, k: train.train_steps(s, b, k, task=task, num_steps=1))
  losses = []
  for _ in range(60):
    state, m = step(state, batch, jax.random.key(1))
    losses.append(float(m['loss'][0]))
  assert losses[-1] < 0.1 * losses[0], losses


def test_split_indices_are_the_course_split():
  train_idx, dev_idx = fashion_mnist.split_indices()
  perm = np.random.RandomState(42).permutation(60000)
  np.testing.assert_array_equal(dev_idx, perm[:10000])
  np.testing.assert_array_equal(train_idx, perm[10000:])
  assert len(set(train_idx) | set(dev_idx)) == 60000 and not set(train_idx) & set(dev_idx)


@needs_fmnist
def test_real_splits_shapes_and_scaling():
  splits = fashion_mnist.load_splits()
  raw = fashion_mnist.load_raw()
  assert {k: v[0].shape for k, v in splits.items()} == {
    'train': (50000, 28, 28, 1),
    'val': (10000, 28, 28, 1),
    'test': (10000, 28, 28, 1),
  }
  _, dev_idx = fashion_mnist.split_indices()
  np.testing.assert_array_equal(splits['val'][0][..., 0], raw['train_images'][dev_idx])
  scaled = fashion_mnist.to_float(splits['train'][0])
  assert scaled.dtype == np.float32 and scaled.max() == 255 / 256  # pixels / 256, as the course did
  assert np.bincount(splits['test'][1]).tolist() == [1000] * 10
  # train_on_val: the 50,000 then the 10,000 val images; val itself unchanged (no longer held out).
  every = fashion_mnist.load_splits(train_on_val=True)
  assert every['train'][0].shape == (60000, 28, 28, 1)
  np.testing.assert_array_equal(every['train'][0][:50000], splits['train'][0])
  np.testing.assert_array_equal(every['train'][0][50000:], splits['val'][0])
  np.testing.assert_array_equal(every['train'][1][50000:], splits['val'][1])
  np.testing.assert_array_equal(every['val'][0], splits['val'][0])


def test_train_on_val_is_checked_against_what_val_would_choose():
  validate = tasks.task_class('classification').validate_config
  validate(override(classifier_config.get_config(), **{'data.train_on_val': True}))
  with pytest.raises(UserError, match='val cannot stop training early'):
    validate(override(classifier_config.get_config(), **{'data.train_on_val': True, 'early_stopping_patience': 2}))
  with pytest.raises(UserError, match='val cannot choose the learning rate'):
    validate(override(classifier_config.get_config('sweep'), **{'data.train_on_val': True}))


def test_missing_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    fashion_mnist.load_raw(str(tmp_path / 'nope'))
  with pytest.raises(UserError, match='no Fashion-MNIST IDX files'):
    fashion_mnist.load_raw(str(tmp_path))


def test_truncated_idx_file_is_named(tmp_path):
  path = tmp_path / 'train-images-idx3-ubyte'
  header = bytes([0, 0, 8, 3]) + (5).to_bytes(4, 'big') + (28).to_bytes(4, 'big') + (28).to_bytes(4, 'big')
  path.write_bytes(header + bytes(100))
  with pytest.raises(UserError, match='truncated'):
    fashion_mnist.read_idx(str(path))


def test_optimizers_build():
  config = classifier_config.get_config()
  for name in ('sgd', 'adam', 'adamw'):
    config.optimizer.name = name
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = 'warmup_cosine'
    config.optimizer.warmup_steps = 10
    tx = optim.make_optimizer(config.optimizer, 100)
    params = {'w': jnp.ones(3)}
    updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
    assert np.isfinite(optax.tree.norm(updates))


def test_offline_tfds_fallback_fails_at_once_with_install_hint(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(fashion_mnist, 'SYSTEM_DIR', str(tmp_path / 'no_system_copy'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  import socket

  def offline(*args, **kwargs):
    raise OSError('network is unreachable')

  monkeypatch.setattr(socket, 'create_connection', offline)
  import time

  start = time.time()
  with pytest.raises(UserError, match='apt-get install dataset-fashion-mnist'):
    fashion_mnist.load_raw()
  assert time.time() - start < 30  # TFDS alone would retry the download for minutes


_ALL_REDUCE_BUFFERS = """
import re, sys, tempfile
import jax
sys.path.insert(0, 'tests')
from conftest import train_step_hlo
from cnn_caption.training import parallel
from configs import classifier
with tempfile.TemporaryDirectory() as workdir:
  hlo = train_step_hlo(classifier.get_config(), workdir, parallel.make_mesh())
results = re.findall(r'= (.*?) all-reduce(?:-start)?\\(', hlo)
print(jax.device_count(), sum(len(re.findall(r'[a-z]+[0-9]*\\[[0-9,]*\\]', r)) for r in results))
"""


def test_a_batch_split_over_devices_costs_one_all_reduce_buffer_per_parameter():
  """The homework step on 2 devices reduces each parameter's gradient (and the loss), not rows of activations.

  Between processes every all-reduce buffer is a gloo collective of a few milliseconds: the per-row outer-product
  kernel gradients of SmallBatchDense once made a batch-8 step carry 56 (up to 0.22 s a step over 2 processes).
  """
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  out = subprocess.run(
    [sys.executable, '-c', _ALL_REDUCE_BUFFERS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  devices, buffers = map(int, out.stdout.split())
  params = 10  # kernel and bias of conv1, conv2, fc1, fc2, fc3
  assert devices == 2 and 1 <= buffers <= params + 1, out.stdout


def test_matmul_input_grad_conv_is_nn_conv():
  """MatmulInputGradConv: nn.Conv's parameters and forward bit for bit, its gradients up to rounding."""
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (3, 9, 8, 5))
  ref, conv = nn.Conv(7, (3, 3), padding='VALID'), classifier.MatmulInputGradConv(7)
  params = ref.init(jax.random.key(1), x)['params']
  jax.tree.map(np.testing.assert_array_equal, conv.init(jax.random.key(1), x)['params'], params)
  np.testing.assert_array_equal(conv.apply({'params': params}, x), ref.apply({'params': params}, x))
  g_conv, g_ref = (
    jax.grad(lambda p, x, m=m: (m.apply({'params': p}, x) ** 2).sum(), argnums=(0, 1))(params, x) for m in (conv, ref)
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_conv, g_ref)


def test_matmul_input_grad_conv_by_hand():
  """One output pixel with gradient 1 sends the kernel itself back onto the input window it read."""
  x = jnp.zeros((1, 4, 5, 2))
  kernel = jnp.arange(1.0, 19.0).reshape(3, 3, 2, 1)
  _, vjp = jax.vjp(classifier.conv_valid_matmul_input_grad, x, kernel)
  dy = jnp.zeros((1, 2, 3, 1)).at[0, 1, 2, 0].set(1.0)  # output row 1, column 2 reads input rows 1..3, columns 2..4
  dx, _ = vjp(dy)
  np.testing.assert_array_equal(dx[0, 1:4, 2:5], kernel[..., 0])
  assert not jnp.any(dx.at[0, 1:4, 2:5].set(0.0))


def test_strided_relu_max_pool_is_reshape_and_max():
  """The strided forward gives reshape-and-max's values bit for bit (odd sizes floor) and the same gradient."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  np.testing.assert_array_equal(classifier.relu_max_pool_2x2_strided(x), classifier.relu_max_pool_2x2(x))
  np.testing.assert_array_equal(classifier.relu_max_pool_2x2_strided(x), classifier.max_pool_2x2(jnp.maximum(x, 0)))
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, 3))
  pools = (classifier.relu_max_pool_2x2_strided, classifier.relu_max_pool_2x2)
  np.testing.assert_array_equal(*(jax.grad(lambda v, f=f: (f(v) * w).sum())(x) for f in pools))
