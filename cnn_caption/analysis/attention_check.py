"""The self-attention identities of homework question 1.3, measured numerically."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_caption import models
from cnn_caption.errors import UserError


@dataclasses.dataclass(frozen=True)
class Check:
  """One verdict of `attention_checks`."""

  name: str
  detail: str  # the measured figure and the criterion
  passed: bool


def _row_softmax(scores: np.ndarray) -> np.ndarray:
  e = np.exp(scores - scores.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _random_invertible(rng: np.random.Generator, dim: int, singular_range: Sequence[float]) -> np.ndarray:
  """B = U diag(s) V^T: U, V Haar-orthogonal, s = r or 1/r with r uniform in singular_range (float64).

  With singular_range = (lo, hi), lo > 1, cond(B) <= hi^2 and no singular value lies in (1/lo, lo):
  B is never close to the identity, which keeps the control check meaningful.
  """

  def haar():
    q, upper = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(upper))

  r = rng.uniform(*singular_range, size=dim)
  s = np.where(rng.random(dim) < 0.5, 1.0 / r, r)
  return haar() @ np.diag(s) @ haar().T


def _with_head2(params, wq_NxD: np.ndarray, wk_NxD: np.ndarray, dtype) -> dict:
  """params (numpy) with head index 1 of the query and key kernels replaced, cast to dtype."""
  params = jax.tree.map(lambda a: np.array(a, np.float64), params)
  params['query']['kernel'][1] = wq_NxD
  params['key']['kernel'][1] = wk_NxD
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def check_config(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(L, n) of a valid attention-check config; UserError naming the culprit otherwise."""
  if config.model.name != 'self_attention':
    raise UserError(
      f"config.model.name={config.model.name!r}: the attention check needs 'self_attention' "
      '(use --config=configs/attention.py)'
    )
  shape = tuple(config.model.input_shape)
  if len(shape) != 2 or shape[0] < 2:
    raise UserError(
      f'config.model.input_shape={shape} is invalid: it must be (L, n) with L >= 2 '
      '(with one position every P(h) is [[1]] and the control cannot fail)'
    )
  if config.model.num_heads < 2:
    raise UserError(
      f'config.model.num_heads={config.model.num_heads} is invalid: the check needs >= 2 heads '
      '(set --config.model.num_heads=2)'
    )
  return shape


@functools.partial(jax.jit, static_argnums=0)
def _probs_and_a(module: nn.Module, params, x_LxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """P (H, L, L) and A (H, n, n) of an attention module (compiled once per module, shape and dtype)."""
  variables = {'params': params}
  probs_HxLxL = module.apply(variables, x_LxN, return_probs=True)[1]
  return probs_HxLxL, module.apply(variables, method=module.attention_matrices)


def attention_checks(config: ml_collections.ConfigDict) -> list[Check]:
  """Measures the Q1.3 identities on a random X (L x n) and the configured module (>= 2 heads).

  Args:
    config: configs/attention.py layout: model (name 'self_attention', input_shape (L, n), num_heads,
      head_dim, scale_scores), seed, and check (tolerances and B's singular-value range).

  Returns:
    One Check per head for P(h) == row-softmax(c X A(h) X^T) and for rank(A(h)) <= d, then the
    two-heads identity with W_Q(2) = W_Q(1) B, W_K(2) = W_K(1) B^-T in float32 and in float64, and
    the control (B on W_Q alone) that must change the probabilities.
  """
  seq_len, model_dim = check_config(config)
  d, tol = config.model.head_dim, config.check
  module = models.create_model(config)
  # All randomness from one numpy Generator: one compiled program per dtype keeps many shapes fast.
  rng = np.random.default_rng(config.seed)
  x_LxN = rng.standard_normal((seq_len, model_dim)).astype(np.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x_LxN)['params']
  # Weights ~ N(0, 1/n): the module's own fan-in scale.
  params = jax.tree.map(lambda p: (rng.standard_normal(p.shape) / math.sqrt(model_dim)).astype(np.float32), shapes)

  probs_and_a = functools.partial(_probs_and_a, module)
  probs_HxLxL, a_HxNxN = probs_and_a(params, x_LxN)
  probs_HxLxL, a_HxNxN = np.asarray(probs_HxLxL, np.float64), np.asarray(a_HxNxN, np.float64)
  x64 = np.asarray(x_LxN, np.float64)
  checks = []

  for h in range(config.model.num_heads):
    ref = _row_softmax(module.score_scale * x64 @ a_HxNxN[h] @ x64.T)
    diff = float(np.abs(probs_HxLxL[h] - ref).max())
    checks.append(
      Check(
        f'P({h + 1}) = row-softmax({_scale_text(module)}X A({h + 1}) X^T)',
        f'max abs diff {diff:.2e} (float32 module vs float64 formula; tol {tol.prob_atol:.0e})',
        diff <= tol.prob_atol,
      )
    )
  for h in range(config.model.num_heads):
    s = np.linalg.svd(a_HxNxN[h], compute_uv=False)
    rank = int(np.sum(s > tol.rank_rtol * s[0])) if s[0] > 0 else 0
    tail = f'; s_{d + 1}/s_1 = {s[d] / s[0]:.1e}' if d < model_dim and s[0] > 0 else ''
    checks.append(
      Check(
        f'rank(A({h + 1})) <= d',
        f'numerical rank {rank} (singular values > {tol.rank_rtol:.0e} * s_1), d = {d}, n = {model_dim}{tail}',
        rank <= d,
      )
    )

  b_DxD = _random_invertible(rng, d, tol.b_singular_range)
  cond_b = float(np.linalg.cond(b_DxD))
  wq1 = np.asarray(params['query']['kernel'][0], np.float64)
  wk1 = np.asarray(params['key']['kernel'][0], np.float64)
  wq2, wk2 = wq1 @ b_DxD, wk1 @ np.linalg.inv(b_DxD).T
  same32 = np.asarray(probs_and_a(_with_head2(params, wq2, wk2, jnp.float32), x_LxN)[0])
  diff32 = float(np.abs(same32[0] - same32[1]).max())
  with jax.enable_x64(True):
    same64, _ = probs_and_a(_with_head2(params, wq2, wk2, jnp.float64), jnp.asarray(x64, jnp.float64))
    dtype64 = same64.dtype
    same64 = np.asarray(same64)
  diff64 = float(np.abs(same64[0] - same64[1]).max())
  control = np.asarray(probs_and_a(_with_head2(params, wq2, wk1, jnp.float32), x_LxN)[0])
  diff_control = float(np.abs(control[0] - control[1]).max())
  b_text = f'random invertible {d}x{d} B, cond(B) = {cond_b:.2f}'
  control_text = f'max abs diff {diff_control:.2e} (must be >= {tol.control_min_diff:.0e})'
  if diff_control < tol.control_min_diff and probs_HxLxL[0].max(axis=-1).min() > 0.999:
    control_text += (
      '; every row of P(1) is nearly one-hot, so the changed scores cannot move it: try another --config.seed'
    )
  checks += [
    Check(
      'W_Q(2) = W_Q(1) B, W_K(2) = W_K(1) B^-T gives P(2) = P(1), float32',
      f'max abs diff {diff32:.2e} (tol {tol.same_atol32:.0e}; {b_text})',
      diff32 <= tol.same_atol32,
    ),
    Check(
      'same, float64',
      f'max abs diff {diff64:.2e} (tol {tol.same_atol64:.0e}; computed in {dtype64})',
      diff64 <= tol.same_atol64 and dtype64 == np.float64,
    ),
    Check('control: W_Q(2) = W_Q(1) B, W_K(2) = W_K(1) changes P', control_text, diff_control >= tol.control_min_diff),
  ]
  return checks


def _scale_text(module) -> str:
  return f'{module.score_scale:.4g} * ' if module.scale_scores else ''


def describe(config: ml_collections.ConfigDict) -> str:
  """One line naming the check's setting (validates the config first)."""
  seq_len, model_dim = check_config(config)
  scaling = 'scores scaled by 1/sqrt(d)' if config.model.get('scale_scores', False) else 'scores not scaled'
  return (
    f'Self-attention check: L={seq_len}, n={model_dim}, d={config.model.head_dim}, '
    f'heads={config.model.num_heads}, seed={config.seed}, {scaling}'
  )
