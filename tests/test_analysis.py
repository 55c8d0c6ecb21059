"""Per-layer tables (question 1): exact counts of the Q1 networks, table mechanics, model summaries."""

import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cnn_caption import cli
from cnn_caption import models
from cnn_caption.analysis import layer_tables as analysis
from cnn_caption.models import encoders

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of configs/<name>.py, loaded by path as ml_collections does."""
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', os.path.join(_REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _rows(config, **overrides):
  model = models.create_model(config, **overrides)
  return analysis.layer_table(model, *models.example_inputs(config), **analysis.call_kwargs(model))


def _as_tuples(rows):
  return [(r.layer, r.kind, r.shape, r.size, r.params) for r in rows]


def _param_count(module, *inputs, **kwargs) -> int:
  """Independent count: every leaf of the 'params' collection that init creates."""
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  variables = jax.eval_shape(lambda *xs: module.init(rngs, *xs, **kwargs), *inputs)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables['params']))


def test_q1_cnn_rows_exact():
  # By formula: conv out = 28 - 5 + 1, params = 8 kernels * (5*5*3 weights + 1 bias);
  # pool out = (24 - 4) // 2 + 1; linear params = (11*11*8 inputs + 1 bias) * 10.
  conv, pool = 28 - 5 + 1, (28 - 5 + 1 - 4) // 2 + 1
  conv_params, linear_params = 8 * (5 * 5 * 3 + 1), (pool * pool * 8 + 1) * 10
  expected = [
    ('input', 'input', (28, 28, 3), 28 * 28 * 3, 0),
    ('conv', 'Conv', (conv, conv, 8), conv * conv * 8, conv_params),
    ('max_pool', 'MaxPool', (pool, pool, 8), pool * pool * 8, 0),
    ('linear', 'Dense', (10,), 10, linear_params),
    ('softmax', 'Softmax', (10,), 10, 0),
  ]
  rows = _rows(_config('q1_cnn'))
  assert _as_tuples(rows) == expected
  # The homework's numbers, literally.
  assert [r.size for r in rows[:4]] == [2352, 4608, 968, 10]
  assert [r.params for r in rows[:4]] == [0, 608, 0, 9690]
  assert analysis.total_params(rows) == 10_298 == conv_params + linear_params


def test_q1_mlp_rows_exact():
  hidden_params, output_params = (28 * 28 * 3 + 1) * 100, (100 + 1) * 10
  expected = [
    ('input', 'input', (28, 28, 3), 2352, 0),
    ('hidden', 'Dense', (100,), 100, hidden_params),
    ('output', 'Dense', (10,), 10, output_params),
    ('softmax', 'Softmax', (10,), 10, 0),
  ]
  rows = _rows(_config('q1_mlp'))
  assert _as_tuples(rows) == expected
  assert (hidden_params, output_params) == (235_300, 1_010)
  assert analysis.total_params(rows) == 236_310


def test_rows_follow_the_config_not_fixed_numbers():
  config = _config('q1_cnn')
  config.model.features = 4
  config.model.pool_strides = (4, 4)
  rows = {r.layer: r for r in _rows(config)}
  assert rows['conv'].params == 4 * (5 * 5 * 3 + 1)
  assert rows['max_pool'].shape == ((24 - 4) // 4 + 1,) * 2 + (4,)
  assert rows['linear'].params == (6 * 6 * 4 + 1) * 10


@pytest.mark.parametrize('name, total', [('q1_cnn', '10,298'), ('q1_mlp', '236,310')])
def test_print_summary(capsys, name, total):
  assert cli.summary(_config(name)) == 0
  out = capsys.readouterr().out.strip()
  assert out.splitlines()[-1] == f'Total parameters: {total}'
  assert out.splitlines()[0] == f'{name}: {"Q1CNN" if name == "q1_cnn" else "Q1MLP"}'


@pytest.mark.slow
def test_launch_summary_end_to_end():
  from conftest import run_launch

  result = run_launch('--config=configs/q1_cnn.py', '--mode=summary', timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == 'Total parameters: 10,298'
  assert any(line.split()[:2] == ['max_pool', 'MaxPool'] for line in lines)


def test_format_table_layout():
  rows = _rows(_config('q1_cnn'))
  lines = analysis.format_table(rows).splitlines()
  assert lines[0].split() == ['layer', 'kind', 'activation', 'shape', 'activation', 'size', 'parameters']
  conv = next(line for line in lines if line.startswith('conv '))
  assert conv.split() == ['conv', 'Conv', '(24,', '24,', '8)', '4,608', '608']
  assert lines[-1] == 'Total parameters: 10,298'


class _Pair(nn.Module):
  """Returns two arrays, to check multi-output rows."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='a')(x), nn.Dense(2, name='b')(x)


class _Nested(nn.Module):
  """Own parameter, a nested module, and a shared module called twice."""

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (5,))
    a, b = _Pair(name='pair')(x * scale)
    shared = nn.Dense(5, name='shared')
    return shared(shared(x)) + a.sum() + b.sum()


def test_layer_table_nesting_sharing_and_own_params():
  x = jnp.zeros((2, 5))
  module = _Nested()
  total = _param_count(module, x)
  assert total == 5 + (5 * 3 + 3) + (5 * 2 + 2) + (5 * 5 + 5)

  rows = analysis.layer_table(module, x)
  assert [r.layer for r in rows] == ['input', 'pair', 'pair/a', 'pair/b', 'shared', '(other)']
  by_layer = {r.layer: r for r in rows}
  assert by_layer['pair'].shapes == ((3,), (2,)) and by_layer['pair'].size == 5
  assert by_layer['pair'].params == (5 * 3 + 3) + (5 * 2 + 2)
  with pytest.raises(ValueError, match='returns 2 arrays'):
    _ = by_layer['pair'].shape
  assert by_layer['(other)'].params == 5  # the top module's own 'scale'
  assert analysis.total_params(rows) == total

  shallow = analysis.layer_table(module, x, depth=1)
  assert [r.layer for r in shallow] == ['input', 'pair', 'shared', '(other)']
  assert analysis.total_params(shallow) == total


def test_layer_table_takes_shape_structs_and_any_batch():
  config = _config('q1_mlp')
  model = models.create_model(config)
  rows = analysis.layer_table(model, jax.ShapeDtypeStruct((3, 28, 28, 3), jnp.float32))
  assert _as_tuples(rows) == _as_tuples(_rows(config))


def test_attention_summary_rows():
  config = _config('attention')
  (seq_len, n), heads, d = config.model.input_shape, config.model.num_heads, config.model.head_dim
  rows = {r.layer: r for r in _rows(config)}
  for name in ('query', 'key', 'value'):
    assert rows[name].params == heads * n * d
    assert rows[name].shape == (heads, seq_len, d)
  assert rows['probs'].shape == (heads, seq_len, seq_len)
  assert rows['mix'].shape == (seq_len, heads * d)


def test_classifier_summary(capsys):
  config = _config('classifier')
  model = models.create_model(config)
  rows = _rows(config)
  assert rows[0].shape == tuple(config.model.input_shape)
  assert rows[-1].size == config.model.num_classes
  kinds = {r.layer: r.kind for r in rows}
  assert 'Conv' in kinds['conv1'] and 'Conv' in kinds['conv2'] and 'Dense' in kinds['fc1']  # the fast layers' classes
  inputs = models.example_inputs(config)
  assert analysis.total_params(rows) == _param_count(model, *inputs, train=False)
  assert cli.summary(config) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith('Total parameters: ')


@pytest.mark.parametrize('name', ['captioner', 'captioner_attention'])
def test_captioner_decoder_table(name):
  config = _config(name, 'smoke')
  vocab = config.model_inputs.vocab_size
  model = models.create_model(config, vocab_size=vocab)
  rows = _rows(config, vocab_size=vocab)
  assert rows[0].shapes == (
    (config.model_inputs.num_regions, config.model_inputs.feature_dim),
    (config.data.max_caption_len + 1,),
  )
  inputs = models.example_inputs(config)
  assert analysis.total_params(rows) == _param_count(model, *inputs, train=False)
  assert any(vocab in shape for r in rows[1:] for shape in r.shapes)  # the vocabulary layer is listed


def _efficientnet_lite0_params() -> int:
  """EfficientNet-B0 stages without squeeze-excitation, stem 32, head 1280, bias-free convs + BN, fc 1000."""
  stages = [
    (1, 3, 16, 1),
    (6, 3, 24, 2),
    (6, 5, 40, 2),
    (6, 3, 80, 3),
    (6, 5, 112, 3),
    (6, 5, 192, 4),
    (6, 3, 320, 1),
  ]  # expand, kernel, out channels, repeats
  total, c = 3 * 3 * 3 * 32 + 2 * 32, 32
  for expand, k, out, repeats in stages:
    for _ in range(repeats):
      mid = c * expand
      if expand != 1:
        total += c * mid + 2 * mid
      total += k * k * mid + 2 * mid + mid * out + 2 * out
      c = out
  return total + 320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000


def _resnet18_params() -> int:
  """ResNet-18: 7x7 stem, 4 stages of 2 basic blocks, 1x1 projection where the shape changes, fc 1000."""

  def block(cin, cout):
    projection = cin * cout + 2 * cout if cin != cout else 0
    return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout + projection

  total, c = 7 * 7 * 3 * 64 + 2 * 64, 64
  for out in (64, 128, 256, 512):
    total += block(c, out) + block(out, out)
    c = out
  return total + 512 * 1000 + 1000


@pytest.mark.parametrize(
  'name, formula, published',
  [
    ('efficientnet_lite0', _efficientnet_lite0_params, 4_652_008),  # timm efficientnet_lite0
    ('resnet18', _resnet18_params, 11_689_512),  # torchvision resnet18
  ],
)
def test_encoder_table(name, formula, published):
  assert formula() == published
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  rows = analysis.layer_table(encoders.create_encoder(name), images, depth=1)
  assert rows[0].shape == (64, 64, 3)
  assert analysis.total_params(rows) == published
