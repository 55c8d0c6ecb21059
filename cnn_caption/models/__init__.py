"""Model registry: `config.model.name` -> a pure Flax (linen) module, its example inputs, shape-only fields.

Each entry carries what differs between models, so no caller needs an `if name == ...`:
  module: 'package.module:Class' (fields come from config.model, see `_model_kwargs`); a config may name
    its own module the same way (`config.model.name = 'my_models:WideCNN'`), with image inputs;
  inputs: positional inputs of a batch for init / eval_shape / tables;
  shape_only: fields that normally come from the data (e.g. the vocabulary size), taken from the config
    where no data is loaded (e.g. --mode=summary).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import importlib

import jax.numpy as jnp
import ml_collections

from cnn_caption.errors import UserError


def _image_inputs(config: ml_collections.ConfigDict, batch_size: int) -> tuple:
  return (jnp.zeros((batch_size, *config.model.input_shape), jnp.float32),)


def _caption_inputs(config: ml_collections.ConfigDict, batch_size: int) -> tuple:
  """Region features B x N x C and input tokens B x (max_caption_len + 1)."""
  num_regions, channels = config.model_inputs.num_regions, config.model_inputs.feature_dim
  feats = jnp.zeros((batch_size, num_regions, channels), jnp.float32)
  tokens = jnp.zeros((batch_size, config.data.max_caption_len + 1), jnp.int32)
  return (feats, tokens)


@dataclasses.dataclass(frozen=True)
class Entry:
  module: str
  inputs: Callable[[ml_collections.ConfigDict, int], tuple] = _image_inputs
  shape_only: Callable[[ml_collections.ConfigDict], dict] = lambda config: {}


_REGISTRY = {
  'classifier': Entry('cnn_caption.models.classifier:FashionCNN'),
  'strong_classifier': Entry('cnn_caption.models.strong_classifier:StrongCNN'),
  'resnet': Entry('cnn_caption.models.resnet:ResNet'),
  'q1_cnn': Entry('cnn_caption.models.q1:Q1CNN'),
  'q1_mlp': Entry('cnn_caption.models.q1:Q1MLP'),
  'self_attention': Entry('cnn_caption.models.attention:MultiHeadSelfAttention'),
  'captioner': Entry(
    'cnn_caption.models.decoders:CaptionDecoder',
    _caption_inputs,
    lambda config: {
      'vocab_size': config.model_inputs.vocab_size,
      **({'scene_classes': config.model_inputs.get('scene_classes', 0)} if config.model.get('scene_head') else {}),
    },
  ),
}


def _entry(config: ml_collections.ConfigDict) -> Entry:
  """The registry entry of config.model.name; a name 'package.module:Class' is a model of your own."""
  name = config.model.name
  if isinstance(name, str) and ':' in name:
    return Entry(name)
  if name not in _REGISTRY:
    raise UserError(
      f'config.model.name={name!r} is unknown; choose one of {sorted(_REGISTRY)} or name your own module '
      "as 'package.module:Class'"
    )
  return _REGISTRY[name]


def _import(path: str, field: str):
  """The object at 'package.module:Name', or UserError naming config.<field>."""
  module_path, _, attr = path.partition(':')
  try:
    module = importlib.import_module(module_path)
  except ImportError as e:
    raise UserError(f'config.{field}={path!r}: cannot import {module_path} ({e}); check the module path') from None
  if not hasattr(module, attr):
    raise UserError(f'config.{field}={path!r}: {module_path} has no {attr!r}; check the class name')
  return getattr(module, attr)


def _model_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """Every field of config.model except bookkeeping ones becomes a module field."""
  skip = {'name', 'input_shape'}
  return {k: v for k, v in model_config.items() if k not in skip}


def create_model(config: ml_collections.ConfigDict, **overrides):
  """Builds the module named by config.model.name with fields from config.model (and overrides)."""
  cls = _import(_entry(config).module, 'model.name')
  kwargs = _model_kwargs(config.model)
  if config.get('half_precision'):  # bfloat16 compute; parameters and optimizer state stay float32
    if 'dtype' not in {f.name for f in dataclasses.fields(cls)}:
      raise UserError(
        f'config.half_precision=True: model {config.model.name!r} has no bfloat16 mode; '
        'set --config.half_precision=False'
      )
    kwargs['dtype'] = jnp.bfloat16
  kwargs.update(overrides)
  return cls(**kwargs)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple:
  """Positional inputs of the right shape and dtype for init / eval_shape / tabulate."""
  return _entry(config).inputs(config, batch_size)


def shape_only_fields(config: ml_collections.ConfigDict) -> dict:
  """Module fields that come from data in training, taken from the config when no data is loaded."""
  return _entry(config).shape_only(config)
