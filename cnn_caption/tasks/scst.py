"""Self-critical sequence training (Rennie et al. 2017): policy gradient on the CIDEr-D of sampled captions.

One SCST step, in three parts:
  1. `sample_captions` (jitted): K captions per image sampled from the current decoder;
  2. `SelfCriticalRewards` (host): CIDEr-D of every sample against its image's references, with document
     frequencies from the TRAINING references, minus a baseline (the greedy caption's CIDEr-D, or the
     mean of the image's other K-1 samples), giving one advantage per sample;
  3. `scst_loss` (inside the generic train step): -advantage * log p(sample), teacher-forced on the
     sampled tokens, so the same train_step that minimises cross-entropy does the policy gradient.

`OnPolicyBatcher` runs 1 and 2 for a batch of images with the current parameters. `ScstTask` is the task of
the generic Trainer (config: configs/captioner_scst.py): everything but the training batches and the loss is
the captioning task's (features, vocabulary, validation, test, plots). A training example is an IMAGE, not a
caption. It starts from a cross-entropy workdir's best parameters (config.init_from).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cnn_caption.captioning import metrics
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError
from cnn_caption.models import decoders
from cnn_caption.tasks import base
from cnn_caption.tasks.captioning import CaptioningTask
from cnn_caption.tasks.captioning import share_data_of
from cnn_caption.tasks.captioning import VOCAB_FILE
from cnn_caption.tasks.captioning import with_scene_loss


def sample_captions(
  model: decoders.CaptionDecoder,
  params: Any,
  feats_BxNxC: jax.Array,
  rng: jax.Array,
  *,
  num_samples: int,
  bos_id: int,
  eos_id: int,
  max_len: int,
  temperature: float = 1.0,
) -> jax.Array:
  """K captions per image sampled token by token from softmax(logits / temperature).

  Jit at the call site with model, num_samples, bos_id, eos_id and max_len static (temperature may be traced).

  Returns:
    tokens_BKxL int32, image-major (row b * K + k is sample k of image b), EOS kept, PAD (0) after it.
  """
  batch = feats_BxNxC.shape[0] * num_samples
  cache, carry = model.apply({'params': params}, feats_BxNxC, num_samples, method=decoders.CaptionDecoder.init_state)
  state = {
    't': jnp.int32(0),
    'carry': carry,
    'last': jnp.full((batch,), bos_id, jnp.int32),
    'done': jnp.zeros((batch,), bool),
    'tokens': jnp.full((batch, max_len), decoders.PAD_ID, jnp.int32),
  }

  def cond(s):
    return (s['t'] < max_len) & ~jnp.all(s['done'])

  def body(s):
    carry, logits_BxV, _ = model.apply(
      {'params': params}, cache, s['carry'], s['last'], method=decoders.CaptionDecoder.step
    )
    token_B = jax.random.categorical(jax.random.fold_in(rng, s['t']), logits_BxV / temperature).astype(jnp.int32)
    token_B = jnp.where(s['done'], decoders.PAD_ID, token_B)
    return {
      't': s['t'] + 1,
      'carry': carry,
      'last': token_B,
      'done': s['done'] | (token_B == eos_id),
      'tokens': s['tokens'].at[:, s['t']].set(token_B),
    }

  return jax.lax.while_loop(cond, body, state)['tokens']


def teacher_forcing_tokens(tokens_BxL: np.ndarray, bos_id: int) -> np.ndarray:
  """[BOS, sampled tokens...]: the layout caption losses read (inputs [:, :-1], targets [:, 1:])."""
  return np.concatenate([np.full((len(tokens_BxL), 1), bos_id, np.int32), np.asarray(tokens_BxL, np.int32)], 1)


def advantages(rewards_BxK: np.ndarray, baseline_B: np.ndarray | None = None) -> np.ndarray:
  """Reward minus baseline: the given per-image baseline (e.g. greedy CIDEr-D), else the mean of the other samples.

  The mean-of-others baseline needs K >= 2; its advantages of one image sum to zero.
  """
  rewards_BxK = np.asarray(rewards_BxK, np.float64)
  if baseline_B is not None:
    return rewards_BxK - np.asarray(baseline_B, np.float64)[:, None]
  k = rewards_BxK.shape[1]
  if k < 2:
    raise ValueError('the mean-of-others baseline needs at least 2 samples per image')
  others_mean = (rewards_BxK.sum(axis=1, keepdims=True) - rewards_BxK) / (k - 1)
  return rewards_BxK - others_mean


class SelfCriticalRewards:
  """Host side of SCST: CIDEr-D rewards with the training references' document frequencies, and advantages."""

  def __init__(self, train_references: metrics.References, decode_fn):
    """decode_fn maps one row of token ids to its words (up to EOS), e.g. Vocab.decode."""
    self.cider = metrics.CiderD(train_references)
    self.decode_fn = decode_fn

  def __call__(
    self, references: metrics.References, samples_BKxL: np.ndarray, greedy_BxL: np.ndarray | None = None
  ) -> dict[str, np.ndarray]:
    """{'reward': BK, 'advantage': BK} for K samples per image (image-major rows)."""
    num_images = len(references)
    k = len(samples_BKxL) // num_images
    if k * num_images != len(samples_BKxL):
      raise ValueError(f'{len(samples_BKxL)} samples are not a multiple of {num_images} images')
    rewards = np.array(
      [
        self.cider.image_score(references[i // k], self.decode_fn(row.tolist()))
        for i, row in enumerate(np.asarray(samples_BKxL))
      ]
    ).reshape(num_images, k)
    baseline = None
    if greedy_BxL is not None:
      baseline = np.array(
        [
          self.cider.image_score(refs, self.decode_fn(row.tolist()))
          for refs, row in zip(references, np.asarray(greedy_BxL))
        ]
      )
    return {
      'reward': rewards.reshape(-1).astype(np.float32),
      'advantage': advantages(rewards, baseline).reshape(-1).astype(np.float32),
    }


def scst_loss(params, batch, *, apply_fn, rngs, train: bool):
  """-advantage * log p(sampled caption), per token, mean over real tokens: the SCST policy gradient.

  batch (image-major, K samples per image): 'feats' (B x N x C, each image once), 'tokens'
  (B x K x (L+1), [BOS, sample..., EOS, PAD...]), 'advantage' (B x K), 'reward' (B x K, logged only).
  The advantage is a constant: no gradient flows into the rewards or the baseline. The decoder runs
  without dropout (train is ignored): the samples were drawn without it, so the gradient is on-policy.
  """
  del train
  num_samples, length = batch['tokens'].shape[1:]
  tokens_BKxL = batch['tokens'].reshape(-1, length)
  feats_BKxNxC = jnp.repeat(batch['feats'], num_samples, axis=0)
  inputs_BxT, targets_BxT = tokens_BKxL[:, :-1], tokens_BKxL[:, 1:]
  logits_BxTxV, _ = apply_fn({'params': params}, feats_BKxNxC, inputs_BxT, train=False, rngs=rngs)
  mask_BxT = (targets_BxT != decoders.PAD_ID).astype(jnp.float32)
  logp_BxT = -optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
  advantage_B = jax.lax.stop_gradient(batch['advantage'].reshape(-1))
  num_tokens = jnp.maximum(mask_BxT.sum(), 1.0)
  loss = -(advantage_B[:, None] * logp_BxT * mask_BxT).sum() / num_tokens
  return loss, {'num_tokens': num_tokens, 'mean_reward': batch['reward'].mean()}


class OnPolicyBatcher:
  """Turns a batch of images into an SCST batch with the CURRENT parameters (host + two jitted calls).

  Called once per optimizer step, before the generic train step (so steps_per_call must be 1): samples
  K captions per image (key folded with the step, so a resumed run draws the same samples), decodes the
  greedy baseline if asked, scores everything with CIDEr-D on host and returns `scst_loss`'s batch.
  """

  def __init__(
    self,
    model: decoders.CaptionDecoder,
    rewards: SelfCriticalRewards,
    *,
    num_samples: int,
    baseline: str,
    bos_id: int,
    eos_id: int,
    max_len: int,
    seed: int,
  ):
    if baseline not in ('greedy', 'mean'):
      raise ValueError(f"baseline={baseline!r}: use 'greedy' or 'mean'")
    self.rewards, self.num_samples, self.baseline, self.bos_id = rewards, num_samples, baseline, bos_id
    self.rng = jax.random.key(seed)
    self._sample = jax.jit(
      functools.partial(sample_captions, model, num_samples=num_samples, bos_id=bos_id, eos_id=eos_id, max_len=max_len)
    )
    self._greedy = jax.jit(
      lambda p, f: decoders.greedy_decode(model, p, f, bos_id=bos_id, eos_id=eos_id, max_len=max_len)[0]
    )

  def __call__(
    self, params, feats_BxNxC: np.ndarray, references: metrics.References, step: int
  ) -> dict[str, np.ndarray]:
    samples = np.asarray(self._sample(params, feats_BxNxC, jax.random.fold_in(self.rng, step)))
    greedy = np.asarray(self._greedy(params, feats_BxNxC)) if self.baseline == 'greedy' else None
    scored = self.rewards(references, samples, greedy)
    num_images = len(feats_BxNxC)
    return {
      'feats': np.asarray(feats_BxNxC),
      'tokens': teacher_forcing_tokens(samples, self.bos_id).reshape(num_images, self.num_samples, -1),
      'advantage': scored['advantage'].reshape(num_images, self.num_samples),
      'reward': scored['reward'].reshape(num_images, self.num_samples),
    }


class ScstTask(CaptioningTask):
  """Implements tasks.base.Task: on-policy batches (the Trainer hands over the current parameters)."""

  on_policy = True  # train_batch needs the current parameters (so one optimizer step per call)

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    super().validate_config(config)
    base.check(config, 'scst.num_samples', base.int_in(2, 2**16), 'an integer >= 2 (samples per image)')
    base.check(config, 'scst.baseline', lambda v: v in ('mean', 'greedy'), "'mean' or 'greedy'")

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh):
    if jax.process_count() > 1:
      raise UserError(
        f'config.task=scst runs in one process ({jax.process_count()} started): its rewards are scored on '
        'the host; launch it without --num_processes'
      )
    if config.steps_per_call != 1:
      raise UserError(
        f'config.steps_per_call={config.steps_per_call}: SCST samples with the parameters of the step '
        'before, so it needs --config.steps_per_call=1'
      )
    if not config.get('init_from'):
      raise UserError(
        'config.init_from is not set: SCST fine-tunes a cross-entropy model; pass '
        '--config.init_from=WORKDIR of a finished captioning run'
      )
    config = share_data_of(config, config.init_from)
    super().__init__(config, workdir, mesh)
    self._check_init_vocab(config.init_from)
    s = config.scst
    self.num_train = len(self.entries['train'])  # one example = one image and its K samples
    self.train_references = vocab_lib.references(self.entries['train'])
    self.batcher = OnPolicyBatcher(
      self.model,
      SelfCriticalRewards(self.train_references, self.vocab.decode),
      num_samples=s.num_samples,
      baseline=s.baseline,
      bos_id=self.vocab.bos_id,
      eos_id=self.vocab.eos_id,
      max_len=config.decoding.max_len,
      seed=config.seed,
    )
    # With a scene head, its cross-entropy goes on beside the policy gradient (config.loss.scene_weight).
    self.loss = with_scene_loss(scst_loss, self.scene_weight)

  def _check_init_vocab(self, init_from: str) -> None:
    path = os.path.join(init_from, VOCAB_FILE)
    if not os.path.exists(path):
      raise UserError(f'{path} not found: config.init_from must be a captioning training workdir')
    if vocab_lib.Vocab.load(path) != self.vocab:
      raise UserError(
        f'{path} differs from the vocabulary of this data/config: config.init_from must be trained on '
        'the same data with the same data.min_word_count'
      )

  def train_batch(self, indices: np.ndarray, step: int, params=None) -> dict[str, np.ndarray]:
    """K sampled captions per image with their advantages (the Trainer passes the current parameters)."""
    if params is None:
      raise ValueError('ScstTask.train_batch needs the current parameters (on_policy)')
    feats = self.train_feats(indices, indices, step)
    batch = self.batcher(params, feats, [self.train_references[i] for i in indices], step)
    if self.scene_weight:
      batch['scene_label'] = self.scene_labels['train'][indices]
    return batch

  @staticmethod
  def metrics(loss, aux, grads) -> dict:
    """The captioning metrics plus the mean CIDEr-D reward; the epoch loss is a plain mean over steps."""
    out = CaptioningTask.metrics(loss, aux, grads)
    del out['loss_weight']
    return {**out, 'mean_reward': aux['mean_reward']}
