"""Self-critical sequence training of a captioner (Rennie et al. 2017) as a task of the generic Trainer.

Everything but the training batches and the loss is the captioning task's: features, vocabulary,
validation (greedy, coco metrics), test, plots. A training example is an IMAGE (not a caption): each
step samples config.scst.num_samples captions per image with the current parameters, scores them with
CIDEr-D against the image's training references (document frequencies from the training references),
subtracts a baseline (the greedy caption's CIDEr-D, or the mean of the other samples) and minimises
-advantage * log p(sample) with the same jitted train step as cross-entropy training.

It starts from a cross-entropy workdir's best parameters (config.init_from; see Trainer).
"""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from cnn_caption import scst
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError
from cnn_caption.tasks.captioning import CaptioningTask
from cnn_caption.tasks.captioning import share_data_of
from cnn_caption.tasks.captioning import VOCAB_FILE


class ScstTask(CaptioningTask):
  """Implements tasks.base.Task: on-policy batches (the Trainer hands over the current parameters)."""

  on_policy = True  # train_batch needs the current parameters (so one optimizer step per call)

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
    self.batcher = scst.OnPolicyBatcher(
      self.model,
      scst.SelfCriticalRewards(self.train_references, self.vocab.decode),
      num_samples=s.num_samples,
      baseline=s.baseline,
      bos_id=self.vocab.bos_id,
      eos_id=self.vocab.eos_id,
      max_len=config.decoding.max_len,
      seed=config.seed,
    )
    self.loss = scst.scst_loss

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
    feats = self.feats['train'][indices].astype(np.float32)
    return self.batcher(params, feats, [self.train_references[i] for i in indices], step)

  @staticmethod
  def metrics(loss, aux, grads) -> dict:
    """The captioning metrics plus the mean CIDEr-D reward; the epoch loss is a plain mean over steps."""
    out = CaptioningTask.metrics(loss, aux, grads)
    del out['loss_weight']
    return {**out, 'mean_reward': aux['mean_reward']}
