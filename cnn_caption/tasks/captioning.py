"""Image captioning task (homework question 3), and captioning new images from a trained workdir.

The encoder is frozen, so its region features are computed once (cnn_caption.features caches them)
and training only ever sees features: a batch is {'feats': BxNxC, 'tokens': Bx(T+2)}.
"""

from __future__ import annotations

import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cnn_caption import checkpoint as checkpoint_lib
from cnn_caption import features as features_lib
from cnn_caption import io_utils
from cnn_caption import memory
from cnn_caption import metrics as metrics_lib
from cnn_caption import models
from cnn_caption import parallel
from cnn_caption import plots
from cnn_caption import run_record
from cnn_caption.data import captions as captions_lib
from cnn_caption.data import images as images_lib
from cnn_caption.data import synthetic
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError
from cnn_caption.models import decoders
from cnn_caption.models import encoders

VOCAB_FILE = 'vocab.json'
CONFIG_FILE = run_record.CONFIG_FILE


def dataset_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.data.dir, or the embedded synthetic scenes written under the workdir."""
  if config.data.dir is not None:
    return config.data.dir
  out = config.data.synthetic_dir or os.path.join(workdir, 'synthetic_data')
  logging.info('no --config.data.dir: using the SYNTHETIC captioned-scenes set in %s', out)
  # Process 0 writes it; the others then find it complete.
  return parallel.main_first(
    lambda: synthetic.make_synthetic_dataset(
      out, config.data.synthetic_num_images, image_size=config.data.image_size, seed=config.seed
    )
  )


def caption_loss(params, batch, *, apply_fn, rngs, train: bool, doubly_stochastic: float = 0.0):
  """Masked token cross-entropy with teacher forcing (padding ignored), mean over real tokens."""
  inputs_BxT, targets_BxT = batch['tokens'][:, :-1], batch['tokens'][:, 1:]
  logits_BxTxV, alphas_BxTxN = apply_fn({'params': params}, batch['feats'], inputs_BxT, train=train, rngs=rngs)
  mask_BxT = (targets_BxT != decoders.PAD_ID).astype(jnp.float32)
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
  num_tokens = jnp.maximum(mask_BxT.sum(), 1.0)
  loss = (nll_BxT * mask_BxT).sum() / num_tokens
  if doubly_stochastic and alphas_BxTxN is not None:
    # Show, Attend and Tell: each region's attention summed over the caption should be near 1.
    coverage_BxN = (alphas_BxTxN * mask_BxT[..., None]).sum(axis=1)
    loss = loss + doubly_stochastic * ((1.0 - coverage_BxN) ** 2).sum(axis=1).mean()
  return loss, {'num_tokens': num_tokens}


class CaptioningTask:
  """Implements tasks.base.Task: frozen-encoder features -> LSTM decoder (plain or attention), coco metrics."""

  selection_metric = 'bleu4'  # overridden by config.selection_metric when the config has it

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.selection_metric = config.get('selection_metric', CaptioningTask.selection_metric)
    parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
    data_dir = dataset_dir(config, workdir)
    self.synthetic = config.data.dir is None
    splits = captions_lib.load_karpathy(data_dir, config.data.image_dir, config.data.on_error)
    for split in ('train', 'val', 'test'):
      if not splits[split]:
        raise UserError(f'{data_dir}/dataset.json has no {split} images; captioning needs train, val and test')
    self.vocab = self._vocab(splits['train'])
    # One extraction call for all splits: one encoder compilation, one progress log.
    all_entries = [e for split in ('train', 'val', 'test') for e in splits[split]]
    feats, ok = features_lib.extract_features(
      config.encoder.name,
      config.encoder.weights,
      [e.path for e in all_entries],
      config.data.image_size,
      config.encoder.cache_dir or os.path.join(workdir, 'features'),
      config.encoder.batch_size,
      config.data.on_error,
    )
    self.feats, self.entries = {}, {}
    start = 0
    for split in ('train', 'val', 'test'):
      rows = slice(start, start + len(splits[split]))
      start = rows.stop
      self.feats[split] = feats[rows][ok[rows]]
      self.entries[split] = [e for e, good in zip(splits[split], ok[rows]) if good]
      if not self.entries[split]:
        raise UserError(f'every {split} image of {data_dir} failed to load; see the warnings above')
    self.references = {split: vocab_lib.references(self.entries[split]) for split in ('val', 'test')}
    self.image_index, self.tokens, _ = vocab_lib.encode_captions(
      self.entries['train'], self.vocab, config.data.max_caption_len
    )
    self.num_train = len(self.tokens)
    self.model = models.create_model(config, vocab_size=len(self.vocab))
    self.loss = functools.partial(caption_loss, doubly_stochastic=config.loss.doubly_stochastic)
    logging.info(
      'captioning: %s images train/val/test %d/%d/%d, %d training captions, vocabulary %d, features %s',
      'SYNTHETIC' if self.synthetic else data_dir,
      *(len(self.entries[s]) for s in ('train', 'val', 'test')),
      self.num_train,
      len(self.vocab),
      self.feats['train'].shape[1:],
    )
    self._decoders = {}

  def _vocab(self, train_entries) -> vocab_lib.Vocab:
    """The workdir's vocabulary when resuming (it must match the checkpoint), else built from train."""
    path = os.path.join(self.workdir, VOCAB_FILE)
    built = vocab_lib.Vocab.build((c for e in train_entries for c in e.captions), self.config.data.min_word_count)
    if os.path.exists(path):
      saved = vocab_lib.Vocab.load(path)
      if saved != built:
        raise UserError(
          f'{path} differs from the vocabulary of this data/config; use a fresh --workdir '
          'or the data the workdir was trained on'
        )
      return saved
    return built

  def example_inputs(self) -> tuple:
    return (jnp.asarray(self.feats['train'][:1], jnp.float32), jnp.asarray(self.tokens[:1, :-1]))

  def train_batch(self, indices: np.ndarray, step: int) -> dict[str, np.ndarray]:
    del step  # no random augmentation
    return {'feats': self.feats['train'][self.image_index[indices]].astype(np.float32), 'tokens': self.tokens[indices]}

  @staticmethod
  def metrics(loss, aux, grads) -> dict:
    return {
      'loss': loss,
      'grad_norm': optax.tree.norm(grads),
      'num_tokens': aux['num_tokens'],
      'loss_weight': aux['num_tokens'],
    }  # the epoch loss is a mean over tokens, not over batches

  def _decode_fn(self, method: str):
    if method not in self._decoders:
      d = self.config.decoding
      kwargs = dict(bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, max_len=d.max_len)
      if method == 'greedy':
        fn = lambda params, feats: decoders.greedy_decode(self.model, params, feats, **kwargs)[0]
      else:
        fn = lambda params, feats: decoders.beam_search(
          self.model, params, feats, beam_size=d.beam_size, length_penalty=d.length_penalty, **kwargs
        )
      # Replicated output: every process reads all the tokens (it cannot read other processes' shards).
      self._decoders[method] = memory.CheckedJit(
        fn,
        knob='eval_batch_size',
        value=self.config.eval_batch_size,
        what=f'{method} decoding',
        out_shardings=parallel.replicated(self.mesh),
      )
    return self._decoders[method]

  def check_memory(self, params) -> None:
    """Compiles greedy decoding (and config.decoding.method's) for eval_batch_size; one line if it cannot fit."""
    b = self.config.eval_batch_size
    feats = {'feats': np.zeros((1, *self.feats['val'].shape[1:]), np.float32)}
    spec = parallel.abstract_batch(feats, b, self.mesh)['feats']
    for method in sorted({'greedy', self.config.decoding.method}):
      self._decode_fn(method).check(params, spec, host_bytes=b * feats['feats'].nbytes)

  def decode(self, params, split: str, method: str = 'greedy') -> list[list[str]]:
    """Captions (word lists) for every image of a split."""
    fn = self._decode_fn(method)
    feats = self.feats[split]
    fetch = lambda rows: {'feats': feats[rows].astype(np.float32)}
    out = []
    for batch, n in parallel.padded_batches(len(feats), self.config.eval_batch_size, fetch):
      tokens = np.asarray(fn(params, parallel.shard_batch({'feats': batch['feats']}, self.mesh)['feats']))[:n]
      out.extend(self.vocab.decode(row.tolist()) for row in tokens)
    return out

  def _scores(self, split: str, hypotheses: list[list[str]], *, meteor: bool = False, per_image: bool = False) -> dict:
    """BLEU-1..4, mean sentence BLEU-4, ROUGE-L, CIDEr-D (and METEOR) of the split's captions."""
    refs = self.references[split]
    scores = metrics_lib.coco_scores(refs, hypotheses, meteor=meteor, per_image=per_image)
    scores['bleu4_sentence_mean'] = metrics_lib.sentence_bleu_mean(refs, hypotheses)
    return scores

  def evaluate(self, params, split: str) -> dict[str, float]:
    return self._scores(split, self.decode(params, split, 'greedy'))

  def save_assets(self, workdir: str) -> None:
    self.vocab.save(os.path.join(workdir, VOCAB_FILE))  # config.json: written by the trainer for every task

  def final_results(self, params, best_params, workdir: str) -> dict:
    """Test metrics (METEOR too) of the best epoch's parameters with config.decoding.method (and greedy)."""
    del params
    method = self.config.decoding.method
    hyps = self.decode(best_params, 'test', method)
    scores = self._scores('test', hyps, meteor=self.config.get('meteor_at_test', True), per_image=True)
    per_image = scores.pop('per_image')
    results = {f'test_{k}': v for k, v in scores.items()}
    results['decoding'] = {
      'method': method,
      'beam_size': self.config.decoding.beam_size if method == 'beam' else 1,
      'max_len': self.config.decoding.max_len,
      'length_penalty': self.config.decoding.length_penalty,
    }
    if method != 'greedy':
      greedy = self._scores('test', self.decode(best_params, 'test', 'greedy'))
      results.update({f'test_greedy_{k}': v for k, v in greedy.items()})
    results['dataset'] = 'synthetic' if self.synthetic else self.config.data.dir
    results['num_images'] = {s: len(self.entries[s]) for s in ('train', 'val', 'test')}
    results['vocab_size'] = len(self.vocab)
    # Per-image CIDEr-D and ROUGE-L: what a paired bootstrap between two runs needs (metrics.paired_bootstrap_ci).
    captions = [
      {'image_name': e.name, 'caption': h, 'cider': c, 'rouge_l': r}
      for e, h, c, r in zip(self.entries['test'], hyps, per_image['cider'], per_image['rouge_l'])
    ]
    if parallel.is_main_process():
      io_utils.write_json(os.path.join(workdir, 'test_captions.json'), captions)
    return results

  def tensorboard_images(self, params, num_images: int = 3) -> dict[str, np.ndarray]:
    """Greedy captions with their attention maps for the first validation images (attention decoders)."""
    if self.config.model.attention_dim is None:
      return {}
    if 'attention' not in self._decoders:
      d = self.config.decoding
      self._decoders['attention'] = jax.jit(
        lambda p, f: decoders.greedy_decode(
          self.model, p, f, bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, max_len=d.max_len
        )
      )
    entries = self.entries['val'][:num_images]
    tokens, alphas = self._decoders['attention'](params, self.feats['val'][: len(entries)].astype(np.float32))
    images = {}
    for entry, row, alphas_LxN in zip(entries, np.asarray(tokens), np.asarray(alphas)):
      words = self.vocab.decode(row.tolist())
      images[f'attention/{entry.name}'] = plots.attention_image(entry.path, words, alphas_LxN)
    return images

  def make_plots(self, history: list[dict], params, workdir: str) -> None:
    del params
    plot_dir = os.path.join(workdir, 'plots')
    plots.plot_curves(
      {'train': [r['train_loss'] for r in history]},
      'training loss (token cross-entropy)',
      os.path.join(plot_dir, 'train_loss.png'),
    )
    plots.plot_curves(
      {
        'corpus BLEU-4': [r['val_bleu4'] for r in history],
        'mean sentence BLEU-4': [r['val_bleu4_sentence_mean'] for r in history],
      },
      'validation BLEU-4 (greedy)',
      os.path.join(plot_dir, 'val_bleu4.png'),
    )
    plots.plot_curves(
      {'CIDEr-D': [r['val_cider'] for r in history]},
      'validation CIDEr-D (greedy)',
      os.path.join(plot_dir, 'val_cider.png'),
    )


def load_trained(workdir: str):
  """(config, vocab, model, params) from a training workdir alone."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise UserError(f'{config_path} not found: --workdir must be a captioning training workdir')
  try:
    with open(config_path, encoding='utf-8') as f:
      saved = json.load(f)
    if not isinstance(saved, dict) or 'encoder' not in saved or 'model' not in saved:
      raise ValueError('not a captioning config (no "encoder" or "model" group)')
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise UserError(
      f'{config_path} is not a readable captioning config ({str(e).splitlines()[0]}); '
      'it is written by --mode=train: retrain or restore the file'
    ) from None
  config = ml_collections.ConfigDict(saved)
  vocab = vocab_lib.Vocab.load(os.path.join(workdir, VOCAB_FILE))
  model = models.create_model(config, vocab_size=len(vocab))
  for sub in ('checkpoints_best', 'checkpoints'):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory):
      ckpt = checkpoint_lib.Checkpointer(directory, config.checkpoint.max_to_keep)
      step = ckpt.latest_step()
      if step is not None:
        params = ckpt.restore_params(step)
        ckpt.close()
        logging.info('caption: parameters from %s/%d', directory, step)
        return config, vocab, model, params
      ckpt.close()
  raise UserError(f'no checkpoint in {workdir}: train first with --mode=train --workdir={workdir}')


class Captioner:
  """Captions new image files with a trained workdir's best parameters (greedy decoding)."""

  def __init__(self, workdir: str):
    self.config, self.vocab, model, self.params = load_trained(workdir)
    encoder, variables = encoders.load_encoder(self.config.encoder.name, self.config.encoder.weights)
    self._encode = jax.jit(lambda x: encoder.apply(variables, x, features_only=True))
    self._decode = jax.jit(
      lambda p, f: decoders.greedy_decode(
        model, p, f, bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, max_len=self.config.decoding.max_len
      )
    )

  def caption(self, path: str) -> tuple[list[str], np.ndarray | None]:
    """(words, attention TxN or None) for one image file; UserError if it cannot be read."""
    pixels = images_lib.load_image(path, self.config.data.image_size, self.config.encoder.name)
    feats = self._encode(pixels[None])
    tokens, alphas = self._decode(self.params, feats.astype(jnp.float32))
    words = self.vocab.decode(np.asarray(tokens[0]).tolist())
    return words, None if alphas is None else np.asarray(alphas[0])
