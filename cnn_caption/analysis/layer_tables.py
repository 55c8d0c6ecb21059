"""Model analysis (Q1): per-layer activation / parameter tables of any configured model.

Tables come from the real Flax module: every submodule `__call__` is intercepted while
`module.init_with_output` runs under `jax.eval_shape`, so no weights are materialised and no
number is written by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import inspect
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnn_caption import models


@dataclasses.dataclass(frozen=True)
class Row:
  """One layer: its output shapes without the batch axis, their total size and its parameters."""

  layer: str  # module path joined with '/', or 'input'
  kind: str  # module class name, or 'input'
  shapes: tuple[tuple[int, ...], ...]  # one per array the layer returns
  size: int  # activation values per example, summed over the returned arrays
  params: int  # parameters in this module and its submodules

  @property
  def shape(self) -> tuple[int, ...]:
    """The activation shape of a single-output layer."""
    if len(self.shapes) != 1:
      raise ValueError(f'layer {self.layer!r} returns {len(self.shapes)} arrays; use .shapes')
    return self.shapes[0]


def _shapes_without_batch(tree) -> tuple[tuple[int, ...], ...]:
  leaves = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'shape')]
  return tuple(tuple(int(d) for d in leaf.shape[1:]) for leaf in leaves)


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _subtree(params, path: tuple[str, ...]):
  node = params
  for name in path:
    if not isinstance(node, Mapping) or name not in node:
      return {}
    node = node[name]
  return node


def layer_table(
  module: nn.Module, *inputs, depth: int | None = None, rngs: dict | None = None, **call_kwargs
) -> list[Row]:
  """Per-layer table of `module` applied to `inputs` (shape-only: runs under `jax.eval_shape`).

  Args:
    module: an unbound linen module.
    *inputs: its positional inputs (arrays or `jax.ShapeDtypeStruct`), axis 0 being the batch.
    depth: list submodules nested at most this deep (1 = direct children); None lists all.
    rngs: init PRNG keys; default 'params' and 'dropout' keys from seed 0 (only shapes are used).
    **call_kwargs: keyword arguments of `module.__call__` (e.g. train=False).

  Returns:
    Row 'input' (all positional inputs), then one row per submodule in call order. A module called
    more than once (shared, or inside a loop or scan) is listed once, with its first call's output.
    Parameters that no listed row holds (the top module's own, or of deeper modules when a parent is
    not listed) are put in a last row '(other)', so the top-level rows sum to the model's total.
  """
  if rngs is None:
    rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  calls: dict[tuple[str, ...], list] = {}  # path -> [kind, output shapes], in call-start order

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name != '__call__' or not path or (depth is not None and len(path) > depth):
      return next_fun(*args, **kwargs)
    first = path not in calls
    if first:
      calls[path] = [type(context.module).__name__, None]
    out = next_fun(*args, **kwargs)
    if first:
      calls[path][1] = _shapes_without_batch(out)
    return out

  init = functools.partial(module.init_with_output, rngs, **call_kwargs)
  with nn.intercept_methods(interceptor):
    _, variables = jax.eval_shape(init, *inputs)
  params = variables.get('params', {})

  input_shapes = _shapes_without_batch(inputs)
  rows = [Row('input', 'input', input_shapes, sum(math.prod(s) for s in input_shapes), 0)]
  for path, (kind, shapes) in calls.items():
    rows.append(Row('/'.join(path), kind, shapes, sum(math.prod(s) for s in shapes), _count(_subtree(params, path))))
  other = _count(params) - sum(_count(_subtree(params, p)) for p in _outermost(list(calls)))
  if other:
    rows.append(Row('(other)', '-', (), 0, other))
  return rows


def _outermost(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
  """Paths with no proper prefix in `paths`."""
  path_set = set(paths)
  return [p for p in paths if not any(p[:i] in path_set for i in range(1, len(p)))]


def total_params(rows: Sequence[Row]) -> int:
  """Sum over the rows not nested inside another listed row: the model's parameter count."""
  by_path = {tuple(r.layer.split('/')): r for r in rows if r.kind != 'input'}
  return sum(by_path[p].params for p in _outermost(list(by_path)))


def _format_shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
  return ' + '.join('(' + ', '.join(str(d) for d in s) + ')' for s in shapes) or '-'


def format_table(rows: Sequence[Row]) -> str:
  """Fixed-width text table; the last line is 'Total parameters: N' with N like 10,298."""
  header = ('layer', 'kind', 'activation shape', 'activation size', 'parameters')
  body = [(r.layer, r.kind, _format_shapes(r.shapes), f'{r.size:,}', f'{r.params:,}') for r in rows]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

  def fmt(line):
    left = [f'{cell:<{w}}' for cell, w in zip(line[:3], widths[:3])]
    right = [f'{cell:>{w}}' for cell, w in zip(line[3:], widths[3:])]
    return '  '.join(left + right).rstrip()

  rule = '-' * len(fmt(header))
  lines = [fmt(header), rule, *(fmt(line) for line in body), rule, f'Total parameters: {total_params(rows):,}']
  return '\n'.join(lines)


def call_kwargs(module: nn.Module) -> dict[str, Any]:
  """train=False for modules whose __call__ takes `train`; nothing otherwise."""
  return {'train': False} if 'train' in inspect.signature(type(module).__call__).parameters else {}


def model_tables(config: ml_collections.ConfigDict) -> list[tuple[str, list[Row]]]:
  """(title, rows) of the configured model, then of its image encoder when the config has one."""
  model = models.create_model(config, **models.shape_only_fields(config))
  tables = [
    (
      f'{config.model.name}: {type(model).__name__}',
      layer_table(model, *models.example_inputs(config), **call_kwargs(model)),
    )
  ]
  if 'encoder' in config:
    from cnn_caption.models import encoders  # heavy; only when asked

    size = config.data.image_size
    encoder = encoders.create_encoder(config.encoder.name)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    logging.info('Tracing encoder %s at %dx%d (shapes only).', config.encoder.name, size, size)
    tables.append(
      (
        f'encoder {config.encoder.name} at {size}x{size}: {type(encoder).__name__} (shapes only, no weights loaded)',
        layer_table(encoder, images, depth=1),
      )
    )
  return tables
