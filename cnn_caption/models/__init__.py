"""Model registry: `config.model.name` -> a pure Flax (linen) module and example inputs."""

from __future__ import annotations

import importlib

import jax.numpy as jnp
import ml_collections

# name -> (module path, class name). Classes take their fields from config.model (see each builder).
_REGISTRY = {
    'classifier': ('cnn_caption.models.classifier', 'FashionCNN'),
    'q1_cnn': ('cnn_caption.models.q1', 'Q1CNN'),
    'q1_mlp': ('cnn_caption.models.q1', 'Q1MLP'),
    'self_attention': ('cnn_caption.models.attention', 'MultiHeadSelfAttention'),
    'captioner': ('cnn_caption.models.decoders', 'CaptionDecoder'),
}


def _model_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """Every field of config.model except bookkeeping ones becomes a module field."""
  skip = {'name', 'input_shape'}
  return {k: v for k, v in model_config.items() if k not in skip}


def create_model(config: ml_collections.ConfigDict, **overrides):
  """Builds the module named by config.model.name with fields from config.model."""
  name = config.model.name
  if name not in _REGISTRY:
    raise ValueError(f'config.model.name={name!r} is unknown; choose one of {sorted(_REGISTRY)}')
  module_path, cls_name = _REGISTRY[name]
  cls = getattr(importlib.import_module(module_path), cls_name)
  kwargs = _model_kwargs(config.model)
  kwargs.update(overrides)
  return cls(**kwargs)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple:
  """Positional inputs of the right shape and dtype for init / eval_shape / tabulate."""
  name = config.model.name
  if name == 'captioner':
    num_regions, channels = config.model_inputs.num_regions, config.model_inputs.feature_dim
    feats = jnp.zeros((batch_size, num_regions, channels), jnp.float32)
    tokens = jnp.zeros((batch_size, config.data.max_caption_len + 1), jnp.int32)
    return (feats, tokens)
  return (jnp.zeros((batch_size, *config.model.input_shape), jnp.float32),)
