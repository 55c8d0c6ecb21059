"""LSTM caption decoders (homework question 3): plain (3a) and additive attention (3b), plus decoding.

Token ids follow the caption vocabulary: PAD = 0, BOS and EOS passed in (the vocab uses EOS = 2).

Speed notes (XLA:CPU): everything that does not depend on the previous step is hoisted out of the time
scan: the region keys W2 s_j once per batch, the embedding half of the LSTM input projection for all steps
at once (as a projected V x 4H table when the vocabulary is smaller than the B*T tokens, which is also
what decoding gathers from), and the vocabulary layer after the scan. The scan body only does the
h-dependent work: one fused matmul h @ [W_hh | W1] and attention. Training and beam search project the
regions through the context half of the gates once per image (softmax weights commute with it), so a step
only mixes the projected regions; greedy decoding projects its context per step instead (cheaper in its
forward-only loop when the caption is shorter than the 49 regions). Every beam of an image shares its
regions. Decoding loops are `lax.while_loop`s that end as soon as every caption has ended.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_caption.errors import UserError

PAD_ID = 0

_ACTIVATIONS = {'relu': nn.relu, 'tanh': jnp.tanh}

# Decoding state carried between steps: {'h': BxH, 'c': BxH}.
Carry = dict[str, jax.Array]
# Per-call constants for `step`: 'table' (Vx4H) always; with attention 'keys' (GxNxA) and either
# 'feats' (GxNxC) or 'feat_gates' (GxNx4H), once per image (G images; K = B / G beams each); with a scene
# head fed to every step, 'scene_gates' (Gx4H).
Cache = dict[str, jax.Array]


class _LSTMStep(nn.Module):
  """One LSTM step (fused i, f, g, o gates), optional additive attention; input gates come precomputed."""

  hidden_dim: int
  attention_dim: int | None
  attention_act: str
  dtype: Any = jnp.float32

  def setup(self):
    gates = 4 * self.hidden_dim
    if self.attention_dim is None:
      self.h_gates = nn.Dense(gates, use_bias=False, kernel_init=nn.initializers.orthogonal(), dtype=self.dtype)
    else:
      # One matmul for everything h_{t-1} feeds: the recurrent gates and the attention query W1 h.
      self.h_gates_query = nn.Dense(gates + self.attention_dim, use_bias=False, dtype=self.dtype)
      self.score = nn.DenseGeneral(1, use_bias=False, dtype=self.dtype)  # v
      self.ctx_gates = nn.Dense(gates, use_bias=False, dtype=self.dtype)

  def project_regions(self, feats_GxNxC: jax.Array) -> jax.Array:
    """The context half of the gates for every region (softmax weights commute with it): GxNx4H."""
    return self.ctx_gates(feats_GxNxC)

  def __call__(
    self, carry: Carry, xgates_Bx4H: jax.Array, regions: dict[str, jax.Array] | None
  ) -> tuple[Carry, tuple[jax.Array, jax.Array | None]]:
    h_BxH, c_BxH = carry['h'], carry['c']
    if self.attention_dim is None:
      gates_Bx4H = xgates_Bx4H + self.h_gates(h_BxH)
      alpha_BxN = None
    else:
      hq = self.h_gates_query(h_BxH)
      hgates_Bx4H, query_BxA = hq[:, : 4 * self.hidden_dim], hq[:, 4 * self.hidden_dim :]
      # Rows of h are K beams per image, image-major; the regions are stored once per image.
      keys_GxNxA = regions['keys']
      batch, images = h_BxH.shape[0], keys_GxNxA.shape[0]
      query_GxKxA = query_BxA.reshape(images, batch // images, self.attention_dim)
      pre_GxKxNxA = _ACTIVATIONS[self.attention_act](keys_GxNxA[:, None] + query_GxKxA[:, :, None])
      # Softmax in float32 whatever the compute dtype (alphas are outputs and feed the coverage loss).
      alpha_GxKxN = jax.nn.softmax(self.score(pre_GxKxNxA)[..., 0].astype(jnp.float32), axis=-1)
      if 'feat_gates' in regions:
        ctx_gates = jnp.einsum('gkn,gnh->gkh', alpha_GxKxN.astype(self.dtype), regions['feat_gates'])
      else:
        ctx_gates = self.ctx_gates(jnp.einsum('gkn,gnc->gkc', alpha_GxKxN.astype(self.dtype), regions['feats']))
      gates_Bx4H = xgates_Bx4H + hgates_Bx4H + ctx_gates.reshape(batch, -1)
      alpha_BxN = alpha_GxKxN.reshape(batch, -1)
    i, f, g, o = jnp.split(gates_Bx4H, 4, axis=-1)
    c_BxH = nn.sigmoid(f) * c_BxH + nn.sigmoid(i) * jnp.tanh(g)
    h_BxH = nn.sigmoid(o) * jnp.tanh(c_BxH)
    return {'h': h_BxH, 'c': c_BxH}, (h_BxH, alpha_BxN)


def _scan_body(cell: _LSTMStep, carry: Carry, xgates_Bx4H: jax.Array, regions):
  return cell(carry, xgates_Bx4H, regions)


_scan_steps = nn.scan(
  _scan_body, variable_broadcast='params', split_rngs={'params': False}, in_axes=(0, nn.broadcast), out_axes=0
)


class CaptionDecoder(nn.Module):
  """LSTM decoder over CNN region features; additive attention when attention_dim is set (Q3b)."""

  vocab_size: int
  embed_dim: int = 100
  hidden_dim: int = 256
  dropout: float = 0.5
  attention_dim: int | None = None
  attention_act: str = 'relu'
  encoder_head_dim: int = 0  # > 0: a trainable encoder head relu6(Dense) maps the input regions to this width first
  # A linear scene-class head on the mean region: its predicted class distribution (never the true class) joins
  # the mean region in the initial state. Needs scene_classes > 0 (the task takes it from the data).
  scene_head: bool = False
  scene_classes: int = 0  # classes of the scene head
  scene_embed_dim: int = 0  # > 0: the distribution enters as a learnt embedding of this width; 0: as it is
  scene_every_step: bool = False  # also add the scene vector to every step's LSTM input
  scene_head_frozen: bool = False  # no gradient reaches the head (e.g. a head set from a linear probe)
  dtype: Any = jnp.float32  # compute dtype (bfloat16 for config.half_precision); params and the LSTM state stay float32

  def setup(self):
    if self.attention_act not in _ACTIVATIONS:
      raise UserError(
        f'config.model.attention_act={self.attention_act!r} is unknown; use one of {sorted(_ACTIVATIONS)}'
      )
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f'config.model.dropout={self.dropout} must be in [0, 1)')
    if self.attention_dim is not None and self.attention_dim <= 0:
      raise UserError(
        f'config.model.attention_dim={self.attention_dim} must be positive, or None for the plain decoder'
      )
    if self.encoder_head_dim < 0:
      raise UserError(f'config.model.encoder_head_dim={self.encoder_head_dim} must be >= 0 (0 = off)')
    if self.encoder_head_dim:
      # The encoder's last 1x1 conv + BatchNorm as one Dense, trained with the decoder; the task starts it
      # from the ImageNet weights (encoders.head_as_dense) and the features are the encoder's 'before_head'.
      self.encoder_head = nn.Dense(self.encoder_head_dim, dtype=self.dtype)
    if self.scene_head:
      if self.scene_classes <= 0:
        raise UserError(
          f'the scene head needs scene classes (got {self.scene_classes}): train on data whose images have a '
          '"class", or set --config.model.scene_head=False'
        )
      if self.scene_embed_dim < 0:
        raise UserError(f'config.model.scene_embed_dim={self.scene_embed_dim} must be >= 0 (0 = the distribution)')
      self.scene_logits_head = nn.Dense(self.scene_classes, dtype=self.dtype)
      if self.scene_embed_dim:
        self.scene_embed = nn.Dense(self.scene_embed_dim, use_bias=False, dtype=self.dtype)
      if self.scene_every_step:
        # Concatenating the scene vector to each step's input = adding its projection to the input gates.
        self.scene_gates = nn.Dense(4 * self.hidden_dim, use_bias=False, dtype=self.dtype)
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
    self.init_h = nn.Dense(self.hidden_dim, dtype=self.dtype)
    self.init_c = nn.Dense(self.hidden_dim, dtype=self.dtype)
    # Embedding half of the LSTM input projection; carries the LSTM gate bias.
    self.x_gates = nn.Dense(4 * self.hidden_dim, dtype=self.dtype)
    if self.attention_dim is not None:
      self.keys = nn.Dense(self.attention_dim, dtype=self.dtype)  # W2 s_j (+ the additive attention bias)
    self.cell = _LSTMStep(self.hidden_dim, self.attention_dim, self.attention_act, self.dtype)
    self.drop = nn.Dropout(self.dropout)
    self.out = nn.Dense(self.vocab_size, dtype=self.dtype)

  def __call__(
    self, feats_BxNxC: jax.Array, tokens_BxT: jax.Array, *, train: bool
  ) -> tuple[jax.Array, jax.Array | None]:
    """Teacher-forced scores: logits[:, t] predicts token t+1 from tokens[:, :t+1].

    Args:
      feats_BxNxC: region features (N regions of C channels per image).
      tokens_BxT: input tokens, [BOS, w1, ..., EOS, PAD...] without the last position.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      (logits_BxTxV, alphas_BxTxN), alphas None for the plain decoder; alphas[:, t] is the attention
      used at step t (it reads h_{t-1}).
    """
    feats_BxNxC = self._regions(feats_BxNxC)
    batch, steps = tokens_BxT.shape
    if batch * steps > self.vocab_size:
      xgates_BxTx4H = jnp.take(self._gate_table(), tokens_BxT, axis=0)
    else:
      xgates_BxTx4H = self.x_gates(self.embed(tokens_BxT))
    return self._run(feats_BxNxC, xgates_BxTx4H, train)

  def forward_embedded(
    self, feats_BxNxC: jax.Array, embeds_BxTxE: jax.Array, *, train: bool
  ) -> tuple[jax.Array, jax.Array | None]:
    """Same as __call__ from word embeddings instead of token ids (for gradient checks)."""
    return self._run(self._regions(feats_BxNxC), self.x_gates(embeds_BxTxE), train)

  def _regions(self, feats_BxNxC: jax.Array) -> jax.Array:
    """The decoder's input regions: the trainable encoder head's output when there is one."""
    if not self.encoder_head_dim:
      return feats_BxNxC
    return jax.nn.relu6(self.encoder_head(feats_BxNxC.astype(self.dtype)))

  def scene_logits(self, feats_BxNxC: jax.Array) -> jax.Array:
    """The scene head's class logits (float32, BxS) from the mean region; needs scene_head."""
    return self._scene_logits(self._regions(feats_BxNxC).mean(axis=1))

  def _scene_logits(self, mean_BxC: jax.Array) -> jax.Array:
    logits_BxS = self.scene_logits_head(mean_BxC).astype(jnp.float32)
    return jax.lax.stop_gradient(logits_BxS) if self.scene_head_frozen else logits_BxS

  def _gate_table(self) -> jax.Array:
    """The embedding half of the gates for every vocabulary word, Vx4H."""
    return self.x_gates(self.embed.embedding)

  def _start(self, feats_BxNxC: jax.Array) -> tuple[Carry, jax.Array | None, jax.Array | None]:
    """(h0, c0), the attention keys (or None) and the scene's share of every step's input gates (or None)."""
    if feats_BxNxC.ndim != 3:
      raise UserError(
        f'caption decoder features have shape {feats_BxNxC.shape}; expected '
        '(batch, regions, channels): flatten the encoder map to regions first'
      )
    mean_BxC = feats_BxNxC.mean(axis=1)
    start_BxD, scene_gates_Bx4H = mean_BxC, None
    if self.scene_head:
      scene_BxS = jax.nn.softmax(self._scene_logits(mean_BxC), axis=-1).astype(mean_BxC.dtype)
      if self.scene_embed_dim:
        scene_BxS = self.scene_embed(scene_BxS)
      start_BxD = jnp.concatenate([mean_BxC, scene_BxS], axis=-1)
      if self.scene_every_step:
        scene_gates_Bx4H = self.scene_gates(scene_BxS)
    # The LSTM state is float32 in every compute dtype: c sums over the whole caption.
    carry = {'h': self.init_h(start_BxD).astype(jnp.float32), 'c': self.init_c(start_BxD).astype(jnp.float32)}
    keys_BxNxA = self.keys(feats_BxNxC) if self.attention_dim is not None else None
    return carry, keys_BxNxA, scene_gates_Bx4H

  def _run(self, feats_BxNxC, xgates_BxTx4H, train):
    carry, keys_BxNxA, scene_gates_Bx4H = self._start(feats_BxNxC)
    if scene_gates_Bx4H is not None:
      xgates_BxTx4H = xgates_BxTx4H + scene_gates_Bx4H[:, None]
    regions = None
    if self.attention_dim is not None:
      # The regions through the context half of the gates once, before the scan: one large matmul instead of
      # a skinny one per step whose weight gradient the backward scan accumulates step by step (2.3-2.5x
      # the training throughput at batch 8 on XLA:CPU; the same sums, other rounding).
      regions = {'feat_gates': self.cell.project_regions(feats_BxNxC.astype(self.dtype)), 'keys': keys_BxNxA}
    _, (h_TxBxH, alphas_TxBxN) = _scan_steps(self.cell, carry, jnp.swapaxes(xgates_BxTx4H, 0, 1), regions)
    h_BxTxH = jnp.swapaxes(h_TxBxH, 0, 1)
    logits_BxTxV = self.out(self.drop(h_BxTxH, deterministic=not train))
    alphas_BxTxN = None if alphas_TxBxN is None else jnp.swapaxes(alphas_TxBxN, 0, 1)
    return logits_BxTxV, alphas_BxTxN

  def init_state(self, feats_BxNxC: jax.Array, repeat: int = 1) -> tuple[Cache, Carry]:
    """Decoding start: the hoisted constants (gate table, region keys) and (h0, c0).

    Args:
      feats_BxNxC: region features.
      repeat: beams per image; carry rows are image-major (b * repeat + k), the cache holds each
        image once.

    Returns:
      (cache, carry) for `step`.
    """
    feats_BxNxC = self._regions(feats_BxNxC)
    carry, keys_BxNxA, scene_gates_Gx4H = self._start(feats_BxNxC)
    carry = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), carry)
    cache = {'table': self._gate_table()}
    if scene_gates_Gx4H is not None:
      cache['scene_gates'] = scene_gates_Gx4H
    if self.attention_dim is not None:
      cache['keys'] = keys_BxNxA
      if repeat > 1:
        # Projecting the N regions once beats projecting K contexts at every step when K * steps > N
        # (beam 3 x 30 steps vs 49 regions: about a third of the beam's FLOPs).
        cache['feat_gates'] = self.cell.project_regions(feats_BxNxC)
      else:
        cache['feats'] = feats_BxNxC.astype(self.dtype)
    return cache, carry

  def step(self, cache: Cache, carry: Carry, token_B: jax.Array) -> tuple[Carry, jax.Array, jax.Array | None]:
    """One decoding step from `init_state`'s cache: returns (carry, logits_BxV, alpha_BxN or None)."""
    xgates_Bx4H = jnp.take(cache['table'], token_B, axis=0)
    if 'scene_gates' in cache:  # once per image; rows are image-major beams
      scene_gates_Gx4H = cache['scene_gates']
      xgates_Bx4H = xgates_Bx4H + jnp.repeat(scene_gates_Gx4H, token_B.shape[0] // scene_gates_Gx4H.shape[0], axis=0)
    regions = {k: v for k, v in cache.items() if k not in ('table', 'scene_gates')} or None
    carry, (h_BxH, alpha_BxN) = self.cell(carry, xgates_Bx4H, regions)
    return carry, self.out(h_BxH), alpha_BxN


def _decode_start(model: CaptionDecoder, params: Any, feats_BxNxC: jax.Array, repeat: int, ensemble: bool = False):
  """init_state's (cache, carry); with `ensemble`, params carry a leading model axis and so do the outputs."""
  start = lambda p: model.apply({'params': p}, feats_BxNxC, repeat, method=CaptionDecoder.init_state)
  return jax.vmap(start)(params) if ensemble else start(params)


def _decode_step(
  model: CaptionDecoder, params: Any, cache: Cache, carry: Carry, token_B: jax.Array, ensemble: bool = False
):
  """One step: (carry, scores_BxV, alpha_BxN or None).

  A single model's scores are its logits. An ensemble (params, cache and carry with a leading axis of M
  models) scores by the log of the mean of the models' probabilities, and its alpha is the models' mean.
  """
  step = lambda p, ca, cr: model.apply({'params': p}, ca, cr, token_B, method=CaptionDecoder.step)
  if not ensemble:
    return step(params, cache, carry)
  carry, logits_MxBxV, alpha_MxBxN = jax.vmap(step)(params, cache, carry)
  logp_MxBxV = jax.nn.log_softmax(logits_MxBxV.astype(jnp.float32), axis=-1)
  logp_BxV = jax.nn.logsumexp(logp_MxBxV, axis=0) - jnp.log(jnp.float32(logp_MxBxV.shape[0]))
  return carry, logp_BxV, None if alpha_MxBxN is None else alpha_MxBxN.mean(0)


def greedy_decode(
  model: CaptionDecoder,
  params: Any,
  feats_BxNxC: jax.Array,
  *,
  bos_id: int,
  eos_id: int,
  max_len: int,
  ensemble: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Greedy captions (argmax fed back) in one while loop that ends early once every caption has ended.

  Jit at the call site: `jax.jit(greedy_decode, static_argnames=('model', 'bos_id', 'eos_id',
  'max_len'))`.

  Args:
    model: the decoder module.
    params: its parameters.
    feats_BxNxC: region features.
    bos_id: first input token.
    eos_id: end token; it is kept in the output, every position after it is PAD (0).
    max_len: generated tokens at most (BOS not counted).
    ensemble: params stack M models of this architecture (leading axis; e.g. seeds): each step takes the
      argmax of their mean probability, and alphas are their mean.

  Returns:
    (tokens_BxL int32, alphas_BxLxN or None): alphas[:, t] is the attention used to choose token t,
    zero after EOS.
  """
  batch, num_regions = feats_BxNxC.shape[:2]
  cache, carry = _decode_start(model, params, feats_BxNxC, 1, ensemble)
  with_alphas = model.attention_dim is not None
  state = {
    't': jnp.int32(0),
    'carry': carry,
    'last': jnp.full((batch,), bos_id, jnp.int32),
    'done': jnp.zeros((batch,), bool),
    'tokens': jnp.full((batch, max_len), PAD_ID, jnp.int32),
  }
  if with_alphas:
    state['alphas'] = jnp.zeros((batch, max_len, num_regions), feats_BxNxC.dtype)

  def cond(s):
    return (s['t'] < max_len) & ~jnp.all(s['done'])

  def body(s):
    carry, logits_BxV, alpha_BxN = _decode_step(model, params, cache, s['carry'], s['last'], ensemble)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    token_B = jnp.where(s['done'], PAD_ID, token_B)
    new = {
      't': s['t'] + 1,
      'carry': carry,
      'last': token_B,
      'done': s['done'] | (token_B == eos_id),
      'tokens': s['tokens'].at[:, s['t']].set(token_B),
    }
    if with_alphas:
      alpha_BxN = jnp.where(s['done'][:, None], 0.0, alpha_BxN)
      new['alphas'] = jax.lax.dynamic_update_slice_in_dim(s['alphas'], alpha_BxN[:, None], s['t'], 1)
    return new

  state = jax.lax.while_loop(cond, body, state)
  return state['tokens'], state.get('alphas')


def beam_search(
  model: CaptionDecoder,
  params: Any,
  feats_BxNxC: jax.Array,
  *,
  bos_id: int,
  eos_id: int,
  max_len: int,
  beam_size: int,
  length_penalty: float = 1.0,
  ensemble: bool = False,
  return_beam: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """Best caption per image by beam search; batched over images, one while loop.

  Keeps beam_size live hypotheses (the best non-EOS ones among the top 2 * beam_size candidates) and
  the beam_size best finished ones by summed log-prob (an EOS candidate among the top beam_size
  candidates finishes its hypothesis, as in fairseq). The search stops once no live hypothesis can
  beat the worst kept finished one (log-probs only fall), or at max_len, where live ones count as
  finished. The answer is the kept hypothesis with the best sum log p / len**length_penalty, len
  counting generated tokens up to and including EOS. beam_size=1 is exactly greedy decoding for every
  length_penalty. Like greedy decoding it may emit any id, PAD included, from an untrained model.
  Jit at the call site with model, bos_id, eos_id, max_len, beam_size and length_penalty static.
  `ensemble`: params stack M models (leading axis), scored by the log of their mean probability.
  `return_beam`: return the whole final beam (the beam_size kept hypotheses) instead of its best.

  Returns:
    tokens_BxL int32, EOS kept, PAD (0) after it. With return_beam: (tokens_BxKxL, logp_BxK, length_BxK),
    the K = beam_size kept hypotheses of each image best first by sum log p / len**length_penalty (the first
    is the caption returned without return_beam), their summed log-probs (-inf for a slot no hypothesis
    filled, possible only for a vocabulary below 2 * beam_size) and lengths (generated tokens, EOS counted).
  """
  k, vocab = beam_size, model.vocab_size
  if not 1 <= k < vocab:
    raise UserError(f'config.decoding.beam_size={beam_size} must be in [1, vocabulary size {vocab})')
  batch = feats_BxNxC.shape[0]
  cache, carry = _decode_start(model, params, feats_BxNxC, k, ensemble)
  rows = (lambda x, i: x[:, i]) if ensemble else (lambda x, i: x[i])  # carry rows sit behind the model axis
  neg_inf = jnp.float32(-jnp.inf)
  image_B1 = jnp.arange(batch)[:, None]
  state = {
    't': jnp.int32(0),
    'carry': carry,
    'last': jnp.full((batch, k), bos_id, jnp.int32),
    # Only beam 0 is live at first so the beams do not start as k copies of one hypothesis.
    'logp': jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None].repeat(batch, 0),
    'tokens': jnp.full((batch, k, max_len), PAD_ID, jnp.int32),
    'fin_logp': jnp.full((batch, k), neg_inf),
    'fin_len': jnp.ones((batch, k), jnp.int32),
    'fin_tokens': jnp.full((batch, k, max_len), PAD_ID, jnp.int32),
  }

  def cond(s):
    return (s['t'] < max_len) & jnp.any(s['logp'].max(1) > s['fin_logp'].min(1))

  def body(s):
    t = s['t']
    carry, logits, _ = _decode_step(model, params, cache, s['carry'], s['last'].reshape(-1), ensemble)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k * vocab)
    cand_logp_Bx2K, cand_BxK2 = jax.lax.top_k(s['logp'].repeat(vocab, 1) + logprobs, 2 * k)
    cand_beam, cand_token = cand_BxK2 // vocab, (cand_BxK2 % vocab).astype(jnp.int32)
    cand_tokens = s['tokens'][image_B1, cand_beam].at[:, :, t].set(cand_token)
    is_eos = cand_token == eos_id
    logp_BxK, pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logp_Bx2K), k)
    beam_BxK = cand_beam[image_B1, pick]
    # Like fairseq, only an EOS among the top k candidates ends a hypothesis (k=1: exactly greedy).
    ends = is_eos & (jnp.arange(2 * k) < k)
    pool_logp = jnp.concatenate([s['fin_logp'], jnp.where(ends, cand_logp_Bx2K, neg_inf)], 1)
    pool_len = jnp.concatenate([s['fin_len'], jnp.full((batch, 2 * k), t + 1)], 1)
    pool_tokens = jnp.concatenate([s['fin_tokens'], cand_tokens], 1)
    fin_logp, keep = jax.lax.top_k(pool_logp, k)
    return {
      't': t + 1,
      'carry': jax.tree.map(lambda x: rows(x, (image_B1 * k + beam_BxK).reshape(-1)), carry),
      'last': cand_token[image_B1, pick],
      'logp': logp_BxK,
      'tokens': cand_tokens[image_B1, pick],
      'fin_logp': fin_logp,
      'fin_len': pool_len[image_B1, keep],
      'fin_tokens': pool_tokens[image_B1, keep],
    }

  s = jax.lax.while_loop(cond, body, state)
  # Live hypotheses join as cut at max_len; after an early stop they rank below every kept one.
  pool_logp = jnp.concatenate([s['fin_logp'], s['logp']], 1)
  pool_len = jnp.concatenate([s['fin_len'], jnp.full((batch, k), max_len)], 1)
  pool_tokens = jnp.concatenate([s['fin_tokens'], s['tokens']], 1)
  best_logp, keep = jax.lax.top_k(pool_logp, k)
  score_BxK = best_logp / pool_len[image_B1, keep].astype(jnp.float32) ** length_penalty
  if return_beam:
    order_BxK = jnp.argsort(-score_BxK, axis=1, stable=True)  # argmax's first of equals comes first
    kept_BxK = keep[image_B1, order_BxK]
    return pool_tokens[image_B1, kept_BxK], best_logp[image_B1, order_BxK], pool_len[image_B1, kept_BxK]
  best_B = keep[jnp.arange(batch), jnp.argmax(score_BxK, axis=1)]
  return pool_tokens[jnp.arange(batch), best_B]
