"""bfloat16 compute (config.half_precision): float32 parameters, and a training loss that tracks float32."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_caption import train
from cnn_caption.models import classifier
from cnn_caption.models import decoders
from conftest import jit_init

STEPS = 300
# Mean loss over the last 50 of 300 steps, bfloat16 vs float32 (same init, data, dropout): the gaps on CPU are a
# small fraction of this bound (about 0.01 for the classifier, a few thousandths for the decoders).
TOLERANCE = 0.08


def _classifier_loss(params, batch, *, apply_fn, rngs, train):
  logp = apply_fn({'params': params}, batch['image'], train=train, rngs=rngs)
  return -jnp.take_along_axis(logp, batch['label'][:, None], axis=1).mean(), {}


def _decoder_loss(params, batch, *, apply_fn, rngs, train):
  logits, _ = apply_fn({'params': params}, batch['feats'], batch['tokens'][:, :-1], train=train, rngs=rngs)
  assert logits.dtype == jnp.float32 or logits.dtype == jnp.bfloat16
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['tokens'][:, 1:]).mean(), {}


def _losses(model, example, batches, loss_fn, learning_rate):
  state = train.create_train_state(model, example, jax.random.key(0), optax.adam(learning_rate))
  task = types.SimpleNamespace(loss=loss_fn, metrics=lambda loss, aux, grads: {'loss': loss})
  batches = jax.tree.map(jnp.asarray, batches)
  num_batches = len(jax.tree.leaves(batches)[0])

  @jax.jit
  def run(state):
    def body(state, i):
      batch = jax.tree.map(lambda x: x[i % num_batches], batches)
      state, metrics = train.train_step(state, batch, jax.random.key(1), task=task)
      return state, metrics['loss']

    return jax.lax.scan(body, state, jnp.arange(STEPS))  # one compilation, one dispatch: keeps the test fast

  state, losses = run(state)
  losses = np.asarray(losses)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(
    leaf.dtype == jnp.float32
    for leaf in jax.tree.leaves(state.opt_state)
    if hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating)
  )
  return losses


def _check_tracks(make_model, example, batches, loss_fn, learning_rate):
  f32 = _losses(make_model(jnp.float32), example, batches, loss_fn, learning_rate)
  bf16 = _losses(make_model(jnp.bfloat16), example, batches, loss_fn, learning_rate)
  assert np.isfinite(bf16).all()
  assert f32[-50:].mean() < 0.7 * f32[:10].mean(), 'float32 did not learn: the comparison would be vacuous'
  assert abs(bf16[-50:].mean() - f32[-50:].mean()) < TOLERANCE, (f32[-50:].mean(), bf16[-50:].mean())


@pytest.mark.slow
def test_classifier_bfloat16_tracks_float32():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, (16, 8)).astype(np.int32)
  # Learnable data: each class lights its own row band of the image, plus noise.
  images = rng.normal(0, 0.3, (16, 8, 28, 28, 1)).astype(np.float32)
  for b in range(16):
    for i in range(8):
      images[b, i, labels[b, i] * 2 : labels[b, i] * 2 + 3] += 1.0
  batches = {'image': images, 'label': labels}
  small = dict(conv1_channels=4, conv2_channels=8, hidden1=32, hidden2=16)  # the homework layers, narrower
  _check_tracks(
    lambda dtype: classifier.FashionCNN(dtype=dtype, **small),
    (jnp.zeros((1, 28, 28, 1)),),
    batches,
    _classifier_loss,
    1e-3,
  )


@pytest.mark.slow
@pytest.mark.parametrize('attention_dim', [None, 16])
def test_decoder_bfloat16_tracks_float32(attention_dim):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(4, 8, 5, 24)).astype(np.float32)
  tokens = rng.integers(3, 40, (4, 8, 11)).astype(np.int32)
  tokens[..., 0] = 1
  batches = {'feats': feats, 'tokens': tokens}

  def make(dtype):
    return decoders.CaptionDecoder(
      vocab_size=40, embed_dim=16, hidden_dim=32, dropout=0.1, attention_dim=attention_dim, dtype=dtype
    )

  _check_tracks(make, (jnp.zeros((1, 5, 24)), jnp.zeros((1, 10), jnp.int32)), batches, _decoder_loss, 3e-3)


@pytest.mark.parametrize('attention_dim', [None, 16])
def test_decoding_runs_in_bfloat16(attention_dim):
  model = decoders.CaptionDecoder(
    vocab_size=40, embed_dim=16, hidden_dim=32, attention_dim=attention_dim, dtype=jnp.bfloat16
  )
  feats = jax.random.normal(jax.random.key(0), (3, 5, 24))
  params = jit_init(model, jax.random.key(1), feats, jnp.zeros((3, 10), jnp.int32), train=False)['params']
  tokens, alphas = decoders.greedy_decode(model, params, feats, bos_id=1, eos_id=2, max_len=6)
  assert tokens.shape == (3, 6)
  if attention_dim:
    assert alphas.dtype == jnp.float32
  beams = decoders.beam_search(model, params, feats, bos_id=1, eos_id=2, max_len=6, beam_size=3)
  assert beams.shape == (3, 6)
