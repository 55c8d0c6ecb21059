"""Multi-head self-attention in the homework's notation (question 1.3).

For head h with W_Q(h), W_K(h), W_V(h) in R^{n x d} and X in R^{L x n}:
  P(h) = row-softmax(c * X W_Q(h) (X W_K(h))^T) = row-softmax(c * X A(h) X^T),  A(h) = W_Q(h) W_K(h)^T,
  head(h) = P(h) X W_V(h), and the output concatenates the heads: (L, H * d). There is no output
  projection. c = 1 by default (the homework's identity); with `scale_scores=True`, c = 1 / sqrt(d).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Variance 1/n per kernel entry, each head initialised independently.
_default_kernel_init = nn.initializers.variance_scaling(
  1.0, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1, batch_axis=(0,)
)


class HeadProjection(nn.Module):
  """Per-head linear map with kernel (H, n, d): x (..., L, n) -> (..., H, L, d)."""

  num_heads: int
  head_dim: int
  kernel_init: nn.initializers.Initializer = _default_kernel_init

  @nn.compact
  def __call__(self, x_BxLxN: jax.Array) -> jax.Array:
    kernel_HxNxD = self.param(
      'kernel', self.kernel_init, (self.num_heads, x_BxLxN.shape[-1], self.head_dim), x_BxLxN.dtype
    )
    return jnp.einsum('...ln,hnd->...hld', x_BxLxN, kernel_HxNxD)


class RowSoftmax(nn.Module):
  """Softmax over the last axis (each row of each head's score matrix) as a layer."""

  @nn.compact
  def __call__(self, scores_BxHxLxL: jax.Array) -> jax.Array:
    return nn.softmax(scores_BxHxLxL, axis=-1)


class HeadMix(nn.Module):
  """Per head P(h) V(h), heads concatenated on the feature axis: (..., L, H * d)."""

  @nn.compact
  def __call__(self, probs_BxHxLxL: jax.Array, v_BxHxLxD: jax.Array) -> jax.Array:
    heads_BxLxHxD = jnp.einsum('...hlm,...hmd->...lhd', probs_BxHxLxL, v_BxHxLxD)
    return heads_BxLxHxD.reshape(*heads_BxLxHxD.shape[:-2], -1)


class MultiHeadSelfAttention(nn.Module):
  """Self-attention with num_heads heads of size head_dim; params query/key/value 'kernel' (H, n, d)."""

  num_heads: int = 2
  head_dim: int = 4
  scale_scores: bool = False  # True: divide scores by sqrt(head_dim); False: the homework's X A X^T

  def setup(self):
    self.query = HeadProjection(self.num_heads, self.head_dim)
    self.key = HeadProjection(self.num_heads, self.head_dim)
    self.value = HeadProjection(self.num_heads, self.head_dim)
    self.probs = RowSoftmax()
    self.mix = HeadMix()

  @property
  def score_scale(self) -> float:
    """The factor c in P(h) = row-softmax(c * X A(h) X^T)."""
    return 1.0 / math.sqrt(self.head_dim) if self.scale_scores else 1.0

  def __call__(self, x: jax.Array, return_probs: bool = False):
    """Attends over the L positions of x.

    Args:
      x: (L, n) or (B, L, n).
      return_probs: also return the per-head attention probabilities.

    Returns:
      Output (L, H * d) (or (B, L, H * d)); with return_probs, also P of shape (H, L, L) (or (B, H, L, L)).
    """
    if x.ndim not in (2, 3):
      raise ValueError(f'MultiHeadSelfAttention takes x of shape (L, n) or (B, L, n), got {x.shape}')
    x_BxLxN = x[None] if x.ndim == 2 else x
    q_BxHxLxD = self.query(x_BxLxN)
    k_BxHxLxD = self.key(x_BxLxN)
    v_BxHxLxD = self.value(x_BxLxN)
    scores_BxHxLxL = jnp.einsum('bhld,bhmd->bhlm', q_BxHxLxD, k_BxHxLxD) * self.score_scale
    probs_BxHxLxL = self.probs(scores_BxHxLxL)
    out_BxLxHD = self.mix(probs_BxHxLxL, v_BxHxLxD)
    if x.ndim == 2:
      out_BxLxHD, probs_BxHxLxL = out_BxLxHD[0], probs_BxHxLxL[0]
    return (out_BxLxHD, probs_BxHxLxL) if return_probs else out_BxLxHD

  def attention_matrices(self) -> jax.Array:
    """A(h) = W_Q(h) W_K(h)^T for every head: (H, n, n). Call via `apply(..., method=...)`."""
    wq_HxNxD = self.query.variables['params']['kernel']
    wk_HxNxD = self.key.variables['params']['kernel']
    return jnp.einsum('hnd,hmd->hnm', wq_HxNxD, wk_HxNxD)
