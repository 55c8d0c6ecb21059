"""Self-critical training: baselines by hand, the policy-gradient sign, sampling layout, CIDEr-D rewards."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption import train
from cnn_caption.errors import UserError
from cnn_caption.models import decoders
from cnn_caption.tasks import scst
from conftest import final_params
from conftest import jit_init
from conftest import override
from conftest import read_jsonl
from conftest import strip_timing

BOS, EOS = 1, 2
VOCAB, REGIONS, CHANNELS, IMAGES, K, MAX_LEN = 9, 4, 5, 3, 4, 6

sample = jax.jit(scst.sample_captions, static_argnames=('model', 'num_samples', 'bos_id', 'eos_id', 'max_len'))


@functools.cache
def _setup(attention_dim):
  model = decoders.CaptionDecoder(vocab_size=VOCAB, embed_dim=6, hidden_dim=8, dropout=0.0, attention_dim=attention_dim)
  feats = jax.random.normal(jax.random.key(0), (IMAGES, REGIONS, CHANNELS))
  params = jit_init(model, jax.random.key(1), feats, jnp.ones((IMAGES, 3), jnp.int32), train=False)['params']
  return model, params, feats


def test_mean_of_others_and_greedy_baselines_by_hand():
  rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
  # Image 1: baselines (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5.  Image 2: 1.5, 1.5, 0.
  np.testing.assert_allclose(scst.advantages(rewards), [[-1.5, 0.0, 1.5], [-1.5, -1.5, 3.0]])
  np.testing.assert_allclose(scst.advantages(rewards).sum(axis=1), 0.0, atol=1e-12)
  np.testing.assert_allclose(scst.advantages(rewards, np.array([2.0, 1.0])), [[-1, 0, 1], [-1, -1, 2]])
  with pytest.raises(ValueError, match='at least 2'):
    scst.advantages(rewards[:, :1])


@pytest.mark.slow
@pytest.mark.parametrize('attention_dim', [None, 4])
def test_samples_are_image_major_padded_after_eos_and_seeded(attention_dim):
  model, params, feats = _setup(attention_dim)
  kwargs = dict(model=model, num_samples=K, bos_id=BOS, eos_id=EOS, max_len=MAX_LEN)
  tokens = np.asarray(sample(params=params, feats_BxNxC=feats, rng=jax.random.key(3), **kwargs))
  assert tokens.shape == (IMAGES * K, MAX_LEN) and tokens.dtype == np.int32
  for row in tokens:
    ends = np.flatnonzero(row == EOS)
    if ends.size:
      assert (row[ends[0] + 1 :] == decoders.PAD_ID).all()
  draw = lambda seed: np.asarray(sample(params=params, feats_BxNxC=feats, rng=jax.random.key(seed), **kwargs))
  np.testing.assert_array_equal(tokens, draw(3))
  assert not np.array_equal(tokens, draw(4))
  # Near-zero temperature: every sample is the greedy caption of its image (rows b*K..b*K+K-1 are image b).
  cold = np.asarray(sample(params=params, feats_BxNxC=feats, rng=jax.random.key(3), temperature=1e-4, **kwargs))
  greedy, _ = jax.jit(decoders.greedy_decode, static_argnames=('model', 'bos_id', 'eos_id', 'max_len'))(
    model, params, feats, bos_id=BOS, eos_id=EOS, max_len=MAX_LEN
  )
  np.testing.assert_array_equal(cold, np.repeat(np.asarray(greedy), K, axis=0))


@functools.partial(jax.jit, static_argnames='model')
def _log_prob(model, params, feats_bk, tokens):
  logits, _ = model.apply({'params': params}, feats_bk, tokens[:, :-1], train=False)
  logp = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return (picked * (tokens[:, 1:] != decoders.PAD_ID)).sum(axis=1)


def test_policy_gradient_sign_on_the_decoder():
  model, params, feats = _setup(4)
  samples = np.asarray(
    sample(
      params=params,
      feats_BxNxC=feats,
      rng=jax.random.key(5),
      model=model,
      num_samples=K,
      bos_id=BOS,
      eos_id=EOS,
      max_len=MAX_LEN,
    )
  )
  batch = {  # image-major: each image's features once, its K samples beside them
    'feats': jnp.asarray(feats),
    'tokens': jnp.asarray(scst.teacher_forcing_tokens(samples, BOS).reshape(IMAGES, K, -1)),
    'reward': jnp.zeros((IMAGES, K)),
  }
  feats_bk, tokens_bk = jnp.repeat(batch['feats'], K, axis=0), batch['tokens'].reshape(IMAGES * K, -1)
  before = _log_prob(model, params, feats_bk, tokens_bk)

  @jax.jit
  def step(advantage):
    grads = jax.grad(
      lambda p: scst.scst_loss(p, {**batch, 'advantage': advantage}, apply_fn=model.apply, rngs={}, train=False)[0]
    )(params)
    return grads, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)

  # Only sample 0 rewarded above its baseline: a gradient step makes it more likely ...
  advantage = jnp.zeros((IMAGES, K)).at[0, 0].set(1.0)
  _, stepped = step(advantage)
  assert _log_prob(model, stepped, feats_bk, tokens_bk)[0] > before[0]
  # ... and below its baseline: less likely.
  _, stepped = step(-advantage)
  assert _log_prob(model, stepped, feats_bk, tokens_bk)[0] < before[0]
  # A sample exactly at its baseline teaches nothing.
  grads, _ = step(jnp.zeros((IMAGES, K)))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_cider_rewards_use_training_document_frequencies_and_baselines():
  words = ['<pad>', '<bos>', '<eos>', '<unk>', 'red', 'circle', 'blue', 'square', 'big']
  decode = lambda ids: [words[i] for i in ids[: ids.index(2)]] if 2 in ids else [words[i] for i in ids if i > 3]
  train_refs = [[['red', 'circle']], [['blue', 'square']], [['big', 'square']]]
  rewards = scst.SelfCriticalRewards(train_refs, decode)
  refs = [[['red', 'circle']]]
  samples = np.array([[4, 5, 2], [6, 7, 2]])  # "red circle" (right), "blue square" (wrong)
  out = rewards(refs, samples)
  assert out['reward'][0] > 0.0 and out['reward'][1] == 0.0
  np.testing.assert_allclose(out['advantage'], [out['reward'][0], -out['reward'][0]], rtol=1e-6)
  # Greedy baseline "red circle": the right sample is at the baseline, the wrong one below it.
  out = rewards(refs, samples, greedy_BxL=np.array([[4, 5, 2]]))
  np.testing.assert_allclose(out['advantage'], [0.0, -out['reward'][0]], atol=1e-6)
  assert out['reward'][0] == pytest.approx(rewards.cider.image_score(refs[0], ['red', 'circle']))


def test_on_policy_batch_is_seeded_by_the_step_and_lines_up():
  model, params, feats = _setup(None)
  words = ['<pad>', '<bos>', '<eos>', '<unk>'] + [f'w{i}' for i in range(4, VOCAB)]
  decode = lambda ids: [words[i] for i in (ids[: ids.index(EOS)] if EOS in ids else ids) if i > 3]
  refs = [[['w4', 'w5']], [['w6', 'w7', 'w8']], [['w5']]]
  batcher = scst.OnPolicyBatcher(
    model,
    scst.SelfCriticalRewards(refs, decode),
    num_samples=K,
    baseline='mean',
    bos_id=BOS,
    eos_id=EOS,
    max_len=MAX_LEN,
    seed=0,
  )
  batch = batcher(params, np.asarray(feats), refs, step=7)
  np.testing.assert_array_equal(batch['feats'], np.asarray(feats))  # each image once, image-major
  assert batch['tokens'].shape == (IMAGES, K, MAX_LEN + 1) and (batch['tokens'][..., 0] == BOS).all()
  assert batch['advantage'].shape == batch['reward'].shape == (IMAGES, K)
  np.testing.assert_allclose(batch['advantage'].sum(1), 0.0, atol=1e-5)
  np.testing.assert_array_equal(batch['tokens'], batcher(params, np.asarray(feats), refs, step=7)['tokens'])
  assert not np.array_equal(batch['tokens'], batcher(params, np.asarray(feats), refs, step=8)['tokens'])


# ---- the SCST task through the generic Trainer ----


@pytest.fixture(scope='module')
def xe_workdir(tmp_path_factory):
  """A cross-entropy smoke run of the plain decoder: what SCST starts from (its features are reused)."""
  from configs import captioner as captioner_config

  workdir = str(tmp_path_factory.mktemp('xe'))
  config = captioner_config.get_config('smoke')
  config.data.synthetic_num_images = 30
  config.num_epochs = 1
  train.train_and_evaluate(config, workdir)
  return workdir


def _scst_config(xe_workdir, **overrides):
  from configs import captioner_scst

  config = captioner_scst.get_config('plain_smoke')
  config.data.synthetic_num_images = 30
  config.init_from = xe_workdir
  config.meteor_at_test = False
  return override(config, **overrides)


@pytest.mark.slow
def test_scst_starts_from_init_from_and_resumes_exactly(xe_workdir, tmp_path):
  straight = str(tmp_path / 'straight')
  results = train.train_and_evaluate(_scst_config(xe_workdir), straight)
  assert results['epochs_trained'] == 2 and 'test_cider' in results and 'best_val_cider' in results
  # The first SCST step starts from the cross-entropy run's best parameters: one epoch at a vanishing
  # learning rate leaves them (to float precision) where init_from put them.
  _, xe_params = final_params(xe_workdir)
  tiny = str(tmp_path / 'tiny')
  train.train_and_evaluate(_scst_config(xe_workdir, num_epochs=1, **{'optimizer.learning_rate': 1e-12}), tiny)
  _, tiny_params = final_params(tiny)
  for a, b in zip(jax.tree.leaves(xe_params), jax.tree.leaves(tiny_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Stopped after epoch 1 and resumed: the same samples (seeded by the step) and the same parameters.
  resumed = str(tmp_path / 'resumed')
  train.train_and_evaluate(_scst_config(xe_workdir, num_epochs=1), resumed)
  train.train_and_evaluate(_scst_config(xe_workdir), resumed)
  (s1, p1), (s2, p2) = final_params(straight), final_params(resumed)
  assert s1 == s2
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert strip_timing(read_jsonl(os.path.join(straight, 'metrics.jsonl'))) == strip_timing(
    read_jsonl(os.path.join(resumed, 'metrics.jsonl'))
  )


@pytest.mark.slow
def test_scst_refuses_a_model_other_than_init_from(xe_workdir, tmp_path):
  with pytest.raises(UserError, match='do not fit this model'):
    train.train_and_evaluate(_scst_config(xe_workdir, **{'model.hidden_dim': 32}), str(tmp_path / 'w'))
  with pytest.raises(UserError, match='steps_per_call=1'):
    train.train_and_evaluate(_scst_config(xe_workdir, steps_per_call=2), str(tmp_path / 'w2'))
  with pytest.raises(UserError, match='init_from is not set'):
    train.train_and_evaluate(_scst_config(xe_workdir, init_from=None), str(tmp_path / 'w3'))
