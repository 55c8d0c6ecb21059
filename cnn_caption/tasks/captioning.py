"""Image captioning task (homework question 3): teacher-forced training, decoding chosen on val, coco metrics.

The encoder is frozen, so its region features are computed once (cnn_caption.captioning.features caches them)
and training only ever sees features: a batch is {'feats': BxNxC, 'tokens': Bx(T+2)} (plus 'scene_label': B
with a trained scene-class head).

Two levers for data sets that are nearly scene classification (UCM-captions), both off by default:
  config.data.dihedral_train / dihedral_test: features of the 8 rotations / mirrors of every image (one cache
    each); a training caption reads one of them chosen by (seed, epoch, caption), val and test decode the mean
    of the 8 (each region map rotated back to the image's orientation first);
  config.model.scene_head with config.loss.scene_weight: a linear class head on the mean region, trained with
    an auxiliary cross-entropy on the images' "class", whose predicted distribution feeds the decoder's initial
    state (models.decoders.CaptionDecoder). Data without classes (the synthetic scenes) trains without it.

One decoding lever, off by default: config.decoding.rerank_neighbours = k > 0 keeps the final beam of every
val / test image decoded by beam search and picks the candidate with the highest consensus CIDEr-D against the
captions of its k nearest training images (captioning.rerank; neighbours among the training images of the
scene head's predicted class when there is one); config.decoding.val_rerank tries several k on val.

`run_baselines` (--mode=baselines) scores captioning.baselines on the features this config's captioner reads
(the dihedral views and means too) and writes each baseline as a workdir that a run compares with.
"""

from __future__ import annotations

import functools
import json
import os

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cnn_caption import config_utils
from cnn_caption import io_utils
from cnn_caption import models
from cnn_caption import plots
from cnn_caption.captioning import baselines as baselines_lib
from cnn_caption.captioning import distinct
from cnn_caption.captioning import features as features_lib
from cnn_caption.captioning import metrics as metrics_lib
from cnn_caption.captioning import rerank as rerank_lib
from cnn_caption.data import augment
from cnn_caption.data import captions as captions_lib
from cnn_caption.data import synthetic
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError
from cnn_caption.models import decoders
from cnn_caption.models import encoders
from cnn_caption.tasks import base
from cnn_caption.training import memory
from cnn_caption.training import parallel
from cnn_caption.training import run_record

VOCAB_FILE = 'vocab.json'
SCENE_CLASSES_FILE = 'scene_classes.json'  # the scene head's class names, in logit order (absent: no head)
CONFIG_FILE = run_record.CONFIG_FILE
ATTENTION_FILE = 'test_attention.npz'  # per test image, the attention over the regions behind each generated word
CAPTIONS_FILE = 'test_captions.json'  # per test image, its caption, references and per-image scores


def synthetic_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the synthetic scenes of a config without config.data.dir live."""
  return config.data.synthetic_dir or os.path.join(workdir, 'synthetic_data')


def dataset_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.data.dir, or the embedded synthetic scenes written under the workdir."""
  if config.data.dir is not None:
    return config.data.dir
  out = synthetic_dir(config, workdir)
  logging.info('no --config.data.dir: using the SYNTHETIC captioned-scenes set in %s', out)
  # Process 0 writes it; the others then find it complete.
  return parallel.main_first(
    lambda: synthetic.make_synthetic_dataset(
      out, config.data.synthetic_num_images, image_size=config.data.image_size, seed=config.seed
    )
  )


def check_beam_sizes(config: ml_collections.ConfigDict, vocab_size: int) -> None:
  """UserError when a beam size config.decoding may use is not below the vocabulary size (beam search needs it)."""
  d = config.get('decoding', {})
  sizes = [('beam_size', d.beam_size)] if d.get('method') == 'beam' else []
  sizes += [('val_beam_sizes', b) for b in d.get('val_beam_sizes') or ()]
  for field, size in sizes:
    if isinstance(size, int) and size >= vocab_size:
      raise UserError(
        f'config.decoding.{field} holds beam size {size}, but the vocabulary has only {vocab_size} entries '
        f'(specials included); use beam sizes below {vocab_size}'
      )


def share_data_of(config: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
  """Unless set, the feature cache and the synthetic data of the workdir `source` are used (nothing recomputed)."""
  cache_dir = os.path.join(source, 'features')
  try:
    with open(os.path.join(source, CONFIG_FILE), encoding='utf-8') as f:
      cache_dir = json.load(f)['encoder']['cache_dir'] or cache_dir  # where source's features went
  except (OSError, ValueError, KeyError, TypeError):
    pass  # no readable config there: its default place
  shared = {
    ('encoder', 'cache_dir'): cache_dir,
    ('data', 'synthetic_dir'): os.path.join(source, 'synthetic_data'),
  }
  updates = {k: v for k, v in shared.items() if config[k[0]].get(k[1]) is None and os.path.isdir(v)}
  if not updates:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  for (group, field), path in updates.items():
    config[group][field] = path
  return config


def scheduled_inputs(inputs_BxT: jax.Array, logits_BxTxV: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Scheduled sampling's decoder inputs: some reference words swapped for the model's own samples.

  Each input word after BOS is, with probability `rate`, replaced by a word sampled from the model's
  prediction for that position (logits[:, t - 1] predicts input t); BOS and PAD stay as they are.
  """
  pick_rng, sample_rng = jax.random.split(rng)
  gold_BxT1 = inputs_BxT[:, 1:]
  sampled_BxT1 = jax.random.categorical(sample_rng, logits_BxTxV[:, :-1].astype(jnp.float32)).astype(gold_BxT1.dtype)
  replace_BxT1 = jax.random.bernoulli(pick_rng, rate, gold_BxT1.shape) & (gold_BxT1 != decoders.PAD_ID)
  return jnp.concatenate([inputs_BxT[:, :1], jnp.where(replace_BxT1, sampled_BxT1, gold_BxT1)], axis=1)


def feature_layer(config: ml_collections.ConfigDict) -> str:
  """The encoder layer a captioner reads: 'before_head' when its decoder trains a copy of the head, else 'head'."""
  head_dim = config.model.get('encoder_head_dim', 0)
  if not head_dim:
    return 'head'
  name = config.encoder.name
  if not name.startswith('efficientnet_lite') or head_dim != encoders.FEATURE_DIMS.get(name):
    raise UserError(
      f'config.model.encoder_head_dim={head_dim} fine-tunes the head of an EfficientNet-Lite encoder: use it '
      f'with config.encoder.name=efficientnet_lite0/1/2 and {encoders.FEATURE_DIMS["efficientnet_lite0"]} '
      f'(the head width), not with {name!r}; 0 turns it off'
    )
  return 'before_head'


def caption_loss(
  params,
  batch,
  *,
  apply_fn,
  rngs,
  train: bool,
  doubly_stochastic: float = 0.0,
  label_smoothing: float = 0.0,
  scheduled_sampling: float = 0.0,
):
  """Masked token cross-entropy with teacher forcing (padding ignored), mean over real tokens.

  label_smoothing > 0 (training only): the target puts 1 - eps on the reference word and eps spread evenly
  over the whole vocabulary; evaluation losses stay the plain cross-entropy.
  scheduled_sampling > 0 (training only; parallel scheduled sampling, Duckworth et al. 2019): a first
  teacher-forced pass without dropout or gradient predicts every position, `scheduled_inputs` swaps that
  share of the input words for samples of those predictions, and the loss is the teacher-forced
  cross-entropy of a second pass over the mixed inputs, against the reference words.
  """
  inputs_BxT, targets_BxT = batch['tokens'][:, :-1], batch['tokens'][:, 1:]
  if scheduled_sampling and train:
    first_BxTxV, _ = apply_fn({'params': params}, batch['feats'], inputs_BxT, train=False)
    rng = jax.random.fold_in(rngs['dropout'], 0x5C4ED)
    inputs_BxT = scheduled_inputs(inputs_BxT, jax.lax.stop_gradient(first_BxTxV), scheduled_sampling, rng)
  logits_BxTxV, alphas_BxTxN = apply_fn({'params': params}, batch['feats'], inputs_BxT, train=train, rngs=rngs)
  mask_BxT = (targets_BxT != decoders.PAD_ID).astype(jnp.float32)
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  if label_smoothing and train:
    vocab = logits_BxTxV.shape[-1]
    soft_BxTxV = optax.smooth_labels(jax.nn.one_hot(targets_BxT, vocab), label_smoothing)
    nll_BxT = optax.softmax_cross_entropy(logits_BxTxV, soft_BxTxV)
  else:
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  num_tokens = jnp.maximum(mask_BxT.sum(), 1.0)
  loss = (nll_BxT * mask_BxT).sum() / num_tokens
  if doubly_stochastic and alphas_BxTxN is not None:
    # Show, Attend and Tell: each region's attention summed over the caption should be near 1.
    coverage_BxN = (alphas_BxTxN * mask_BxT[..., None]).sum(axis=1)
    loss = loss + doubly_stochastic * ((1.0 - coverage_BxN) ** 2).sum(axis=1).mean()
  return loss, {'num_tokens': num_tokens}


def _mean_pooled(feats, rows_per_read: int = 256) -> np.ndarray:
  """N x C float32: the region features of each image (N x R x C, e.g. a FeatureStore) averaged over regions."""
  return np.concatenate(
    [np.asarray(feats[s : s + rows_per_read], np.float32).mean(axis=1) for s in range(0, len(feats), rows_per_read)]
  )


def with_scene_loss(loss_fn, scene_weight: float):
  """loss_fn plus scene_weight x the scene head's cross-entropy on batch['scene_label'] (0: loss_fn itself).

  The class logits come from the same features as the captions (batch['feats'], images x N x C); aux gains
  'scene_loss' (the unweighted cross-entropy) and 'scene_correct' (the share of images classified right).
  """
  if not scene_weight:
    return loss_fn

  def loss(params, batch, *, apply_fn, rngs, train: bool):
    value, aux = loss_fn(params, batch, apply_fn=apply_fn, rngs=rngs, train=train)
    logits_BxS = apply_fn({'params': params}, batch['feats'], method='scene_logits')
    labels_B = batch['scene_label']
    scene_ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxS, labels_B).mean()
    correct = (jnp.argmax(logits_BxS, axis=-1) == labels_B).mean()
    return value + scene_weight * scene_ce, {**aux, 'scene_loss': scene_ce, 'scene_correct': correct}

  return loss


def caption_rows(
  entries: list[captions_lib.ImageEntry],
  references: metrics_lib.References,
  hypotheses: list[list[str]],
  per_image: dict[str, list[float]],
) -> list[dict]:
  """test_captions.json: per test image its name, caption, references, per-image scores and class (if any).

  per_image: metrics.caption_scores(..., per_image=True)['per_image'] of the hypotheses. The per-image scores
  are what a paired bootstrap between two workdirs needs (captioning.compare) and what the report's caption
  table shows.
  """
  rows = []
  for i, (entry, hyp) in enumerate(zip(entries, hypotheses, strict=True)):
    row = {
      'image_name': entry.name,
      'caption': hyp,
      'references': [' '.join(r) for r in references[i]],
      'cider': per_image['cider'][i],
      'bleu4': per_image['bleu4'][i],
      'rouge_l': per_image['rouge_l'][i],
    }
    if entry.category is not None:
      row['class'] = entry.category
    rows.append(row)
  return rows


def dihedral_choice(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The dihedral transform (0..7) each training example reads in `epoch`: a function of (seed, epoch) only.

  An example is seen once per epoch, so a resumed run (any steps_per_call, any process count) reads the
  same transforms as an uninterrupted one.
  """
  rng = np.random.default_rng([seed, epoch, 0xD1ED])
  return rng.integers(augment.NUM_DIHEDRAL, size=num_examples)


class CaptioningTask(base.Task):
  """Frozen-encoder features -> LSTM decoder (plain or attention), teacher forcing, coco metrics."""

  selection_metric = 'bleu4'  # overridden by config.selection_metric when the config has it
  _train_pool_cache = None  # _train_pool's (pool, views), once read
  _beams_cache = None  # (params, split, beam size, length penalty, decode_beams' result): the last final beam
  _val_decoded = None  # (params, setting, val captions) of the decoding _choose_decoding chose

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    check, pos_int = base.check, base.pos_int
    check(config, 'loss.scheduled_sampling', base.prob, 'in [0, 1) (0 = off)')
    check(config, 'loss.doubly_stochastic', base.nonneg, 'a finite number >= 0 (0 = off)')
    check(config, 'model.encoder_head_dim', base.nonneg_int, 'an integer >= 0 (0 = off; 1280 fine-tunes the head)')
    check(config, 'model.scene_embed_dim', base.nonneg_int, 'an integer >= 0 (0 = the class distribution itself)')
    if config.get('scene_head_init', 'random') not in ('random', 'probe'):
      raise UserError(f"config.scene_head_init={config.scene_head_init!r} must be 'random' or 'probe'")
    check(config, 'loss.scene_weight', base.nonneg, 'a finite number >= 0 (0 = no scene-class loss)')
    for field in ('model.scene_head', 'model.scene_every_step', 'data.dihedral_train', 'data.dihedral_test'):
      check(config, field, lambda v: isinstance(v, bool), 'True or False')
    if base.get_field(config, 'loss.scene_weight') and not base.get_field(config, 'model.scene_head'):
      raise UserError(
        f'config.loss.scene_weight={config.loss.scene_weight} trains a scene head, but config.model.scene_head '
        'is off; set --config.model.scene_head=True or --config.loss.scene_weight=0'
      )
    check(config, 'model.attention_act', lambda v: v in ('relu', 'tanh'), "'relu' or 'tanh'")
    check(config, 'data.synthetic_num_images', pos_int, 'a positive integer')
    check(config, 'encoder.batch_size', pos_int, 'a positive integer')
    check(config, 'data.on_error', lambda v: v in ('raise', 'skip'), "'raise' or 'skip'")
    check(config, 'data.image_size', pos_int, 'a positive integer')
    check(config, 'data.max_caption_len', pos_int, 'a positive integer')
    check(config, 'data.min_word_count', pos_int, 'a positive integer')
    check(config, 'decoding.length_penalty', base.finite, 'a finite number')
    check(config, 'decoding.method', lambda v: v in ('greedy', 'beam'), "'greedy' or 'beam'")
    check(config, 'decoding.beam_size', pos_int, 'a positive integer')
    check(config, 'decoding.max_len', pos_int, 'a positive integer')
    check(config, 'decoding.val_beam_sizes', lambda v: not v or base.pos_ints(v), 'a tuple of positive beam sizes')
    check(
      config, 'decoding.val_length_penalties', lambda v: all(base.finite(x) for x in v), 'a tuple of finite numbers'
    )
    check(config, 'decoding.rerank_neighbours', base.nonneg_int, 'an integer >= 0 (0 = off)')
    check(config, 'decoding.rerank_weight', base.finite, 'a finite number (0 = consensus alone)')
    check(
      config,
      'decoding.val_rerank',
      lambda v: isinstance(v, (tuple, list)) and all(base.nonneg_int(x) for x in v),
      'a tuple of neighbour counts >= 0 (0 = no reranking)',
    )
    check(config, 'decoding.rerank_template', lambda v: isinstance(v, bool), 'True or False')
    check(config, 'decoding.template_fallback', lambda v: isinstance(v, bool), 'True or False')
    check(
      config,
      'decoding.val_rerank_template',
      lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, bool) for x in v),
      'a tuple of True/False, e.g. (False, True)',
    )
    d = config.get('decoding', {})
    if (d.get('rerank_template') or any(d.get('val_rerank_template') or ())) and d.get('rerank_weight'):
      raise UserError(
        f'config.decoding.rerank_weight={d.rerank_weight} mixes in log-probs, which the class template (a '
        'training caption, not a beam candidate) has none of; set --config.decoding.rerank_weight=0 or '
        '--config.decoding.rerank_template=False --config.decoding.val_rerank_template="()"'
      )
    if d.get('val_rerank') and not any(b > 1 for b in d.get('val_beam_sizes') or ()):
      raise UserError(
        f'config.decoding.val_rerank={tuple(d.val_rerank)} reranks beam candidates, but config.decoding.'
        'val_beam_sizes has no beam size > 1; add one, e.g. --config.decoding.val_beam_sizes="(1, 3)", or set '
        '--config.decoding.val_rerank="()"'
      )
    beams = d.get('val_beam_sizes') or ((d.get('beam_size') or 1) if d.get('method') == 'beam' else 1,)
    if d.get('rerank_neighbours') and not any(b > 1 for b in beams):
      raise UserError(
        f'config.decoding.rerank_neighbours={d.rerank_neighbours} reranks beam candidates, but decoding is '
        'greedy; set --config.decoding.method=beam (or a beam size > 1 in config.decoding.val_beam_sizes), or '
        '--config.decoding.rerank_neighbours=0'
      )
    if d.get('val_length_penalties') and not any(b > 1 for b in d.get('val_beam_sizes') or ()):
      raise UserError(
        f'config.decoding.val_length_penalties={tuple(d.val_length_penalties)} needs a beam size > 1 in '
        'config.decoding.val_beam_sizes (greedy decoding has no length penalty); add one, e.g. '
        '--config.decoding.val_beam_sizes="(1, 3)", or set --config.decoding.val_length_penalties="()"'
      )
    if base.get_field(config, 'data.dir') is None:  # synthetic scenes: the vocabulary is bounded before they exist
      check_beam_sizes(config, len(vocab_lib.SPECIALS) + len(synthetic.caption_words()))
    check(
      config,
      'selection_metric',
      lambda v: v in metrics_lib.VALIDATION_METRICS,
      f'one of {", ".join(metrics_lib.VALIDATION_METRICS)} (METEOR is computed at test only)',
    )

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, *, ensemble: bool = False):
    self.ensemble = ensemble  # decoding params stack several models on a leading axis (inference.ensemble_results)
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.selection_metric = config.get('selection_metric', CaptioningTask.selection_metric)
    parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
    # config.eval_xla_options: XLA options for the decoding programs (evaluation, captions), not the train step.
    self._eval_options = config_utils.compiler_options(config, 'eval_xla_options')
    data_dir = dataset_dir(config, workdir)
    self.synthetic = config.data.dir is None
    splits = captions_lib.load_karpathy(data_dir, config.data.image_dir, config.data.on_error)
    for split in ('train', 'val', 'test'):
      if not splits[split]:
        raise UserError(f'{data_dir}/dataset.json has no {split} images; captioning needs train, val and test')
    self.vocab = self._vocab(splits['train'])
    check_beam_sizes(config, len(self.vocab))  # before any feature is computed
    self.scene_classes = self._scene_classes(splits['train'])
    # One extraction call per transform for all splits: one encoder compilation, one progress log.
    all_entries = [e for split in ('train', 'val', 'test') for e in splits[split]]
    dihedral_train, dihedral_test = config.data.get('dihedral_train', False), config.data.get('dihedral_test', False)
    stores = []
    ok = np.ones((len(all_entries),), bool)
    for transform in range(augment.NUM_DIHEDRAL if dihedral_train or dihedral_test else 1):
      store, transform_ok = features_lib.extract_features(
        config.encoder.name,
        config.encoder.weights,
        [e.path for e in all_entries],
        config.data.image_size,
        config.encoder.cache_dir or os.path.join(workdir, 'features'),
        config.encoder.batch_size,
        config.data.on_error,
        layer=feature_layer(config),
        transform=transform,
      )
      stores.append(store)
      ok &= transform_ok
    eval_feats = features_lib.dihedral_mean(stores) if dihedral_test else stores[0]
    self.feats, self.entries = {}, {}
    self.train_views = []  # with dihedral_train, the train features of each transform
    start = 0
    for split in ('train', 'val', 'test'):
      rows = slice(start, start + len(splits[split]))
      start = rows.stop
      self.feats[split] = (stores[0] if split == 'train' else eval_feats)[rows][ok[rows]]
      if split == 'train' and dihedral_train:
        self.train_views = [store[rows][ok[rows]] for store in stores]
      self.entries[split] = [e for e, good in zip(splits[split], ok[rows]) if good]
      if not self.entries[split]:
        raise UserError(f'every {split} image of {data_dir} failed to load; see the warnings above')
    index = {name: i for i, name in enumerate(self.scene_classes)}
    # -1: no class, or one the training images do not have (never predicted, so counted wrong).
    self.scene_labels = {
      split: np.array([index.get(e.scene_class, -1) for e in self.entries[split]], np.int32)
      for split in ('train', 'val', 'test')
    }
    self.references = {split: vocab_lib.references(self.entries[split]) for split in ('val', 'test')}
    self.image_index, self.tokens, _ = vocab_lib.encode_captions(
      self.entries['train'], self.vocab, config.data.max_caption_len
    )
    self.num_train = len(self.tokens)
    scene = {}
    if config.model.get('scene_head', False):  # on when the data has classes (_scene_classes says so if not)
      scene = {'scene_head': bool(self.scene_classes), 'scene_classes': len(self.scene_classes)}
    self.model = models.create_model(config, vocab_size=len(self.vocab), **scene)
    self.scene_weight = config.loss.get('scene_weight', 0.0) if self.scene_classes else 0.0
    self.loss = with_scene_loss(
      functools.partial(
        caption_loss,
        doubly_stochastic=config.loss.doubly_stochastic,
        label_smoothing=config.loss.get('label_smoothing', 0.0),
        scheduled_sampling=config.loss.get('scheduled_sampling', 0.0),
      ),
      self.scene_weight,
    )
    logging.info(
      'captioning: %s images train/val/test %d/%d/%d, %d training captions, vocabulary %d, features %s',
      'SYNTHETIC' if self.synthetic else data_dir,
      *(len(self.entries[s]) for s in ('train', 'val', 'test')),
      self.num_train,
      len(self.vocab),
      self.feats['train'].shape[1:],
    )
    if self.scene_classes:
      logging.info(
        'scene head: %d classes, loss weight %g, features%s%s',
        len(self.scene_classes),
        self.scene_weight,
        ' of one of 8 rotations/mirrors in training' if dihedral_train else '',
        ', mean of the 8 at val/test' if dihedral_test else '',
      )
    self._decoders = {}
    self._rerank_inputs = {}  # consensus reranking: 'train' -> (scorer, pool features, references); split -> features

  def _scene_classes(self, train_entries) -> list[str]:
    """The scene head's classes (sorted train classes); [] without config.model.scene_head or without classes."""
    if not self.config.model.get('scene_head', False):
      return []
    missing = sum(e.scene_class is None for e in train_entries)
    if missing == len(train_entries):
      logging.info('scene head: off, the training images have no "class" (e.g. the synthetic scenes)')
      return []
    if missing:
      raise UserError(
        f'{missing} of {len(train_entries)} training images have no "class" in dataset.json; give every '
        'training image a class or set --config.model.scene_head=False'
      )
    names = sorted({e.scene_class for e in train_entries})
    path = os.path.join(self.workdir, SCENE_CLASSES_FILE)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        saved = json.load(f)
      if saved != names:
        raise UserError(
          f'{path} lists other scene classes than this data; use a fresh --workdir or the data the workdir was '
          'trained on'
        )
    return names

  def initial_params(self, params):
    """A fresh model's starting parameters where the config asks for more than the random init.

    The trainable encoder head starts from the encoder's ImageNet head (folded BatchNorm); with
    config.scene_head_init='probe' the scene head starts as the linear probe of captioning.baselines (softmax
    regression on the standardised training features, with their dihedral views when the data has them, l2
    config.scene_probe_l2), its standardisation folded into the head's weights and bias.
    """
    if self.scene_classes and self.config.get('scene_head_init', 'random') == 'probe':
      params = self._probe_scene_head(params)
    if feature_layer(self.config) == 'head':
      return params
    _, variables = encoders.load_encoder(self.config.encoder.name, self.config.encoder.weights)
    head = encoders.head_as_dense(jax.tree.map(np.asarray, variables))
    logging.info('encoder head: trainable, from the %s ImageNet weights', self.config.encoder.name)
    return {**params, 'encoder_head': jax.tree.map(jnp.asarray, head)}

  def _probe_scene_head(self, params):
    pool, views = self._train_pool()
    x = views.reshape(-1, views.shape[-1]) if views is not None else pool
    train_labels = self.labels('train') * (len(x) // len(pool))  # views are view-major (view 0's rows first)
    probe = baselines_lib.fit_linear_probe(
      x, train_labels, _mean_pooled(self.feats['val']), self.labels('val'), l2_grid=(self.config.scene_probe_l2,)
    )
    if list(probe.classes) != list(self.scene_classes):
      raise UserError('the linear probe found other classes than the scene head; the training classes changed')
    kernel_CxS = probe.weights / probe.scale[:, None]
    bias_S = probe.bias - (probe.mean / probe.scale) @ probe.weights
    flat = traverse_util.flatten_dict(params)
    (kernel_path,) = [k for k in flat if k[-2:] == ('scene_logits_head', 'kernel')]
    flat[kernel_path] = jnp.asarray(kernel_CxS, jnp.float32)
    flat[(*kernel_path[:-1], 'bias')] = jnp.asarray(bias_S, jnp.float32)
    logging.info('scene head: set from a linear probe (l2 %g, val class accuracy %.4f)', probe.l2, probe.val_accuracy)
    return traverse_util.unflatten_dict(flat)

  def labels(self, split: str) -> list[str] | None:
    """The class of every image of a split (dataset.json's `class`), or None unless every image has one."""
    labels = [e.label for e in self.entries[split]]
    return None if None in labels else labels

  def baseline_data(self) -> baselines_lib.BaselineData:
    """References, mean-pooled encoder features and classes of every split, for captioning.baselines.

    The features are those the captioner reads. Val and test: the features decoding reads (the mean of the 8
    dihedral transforms with config.data.dihedral_test). Train: with config.data.dihedral_train, each
    transform's features as `train_views` (the probe's 8 rows per image) and their mean as
    features['train'] (the nearest-neighbour pool); without it, the untransformed image's.
    """
    splits = ('train', 'val', 'test')
    labels = {s: self.labels(s) for s in splits}
    features = {s: _mean_pooled(self.feats[s]) for s in ('val', 'test')}
    notes = []
    features['train'], train_views = self._train_pool()
    if train_views is not None:
      notes.append(f'train: {len(train_views)} dihedral views per image (probe: one row each; neighbours: their mean)')
    if self.config.data.get('dihedral_test', False):
      notes.append(f'val/test: mean of the {augment.NUM_DIHEDRAL} dihedral views')
    return baselines_lib.BaselineData(
      references={s: vocab_lib.references(self.entries[s]) for s in splits},
      features={s: features[s] for s in splits},
      labels=None if any(v is None for v in labels.values()) else labels,
      train_views=train_views,
      feature_note='; '.join(['encoder features, mean over regions', *notes]),
    )

  def _train_pool(self) -> tuple[np.ndarray, np.ndarray | None]:
    """The training images' mean-pooled features as a neighbour pool (N x C), and per view (V x N x C) or None.

    With config.data.dihedral_train the pool is each image's mean over its views, else its untransformed
    features: the pool of the nearest-neighbour baseline and of consensus reranking.
    """
    if self._train_pool_cache is None:  # read once: the probe head, the baselines and reranking all use it
      if not self.train_views:
        self._train_pool_cache = (_mean_pooled(self.feats['train']), None)
      else:
        train_views = np.stack([_mean_pooled(view) for view in self.train_views])
        self._train_pool_cache = (train_views.mean(axis=0), train_views)
    return self._train_pool_cache

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

  def train_batch(self, indices: np.ndarray, step: int, params=None) -> dict[str, np.ndarray]:
    del params  # teacher forcing: batches do not depend on the model
    images = self.image_index[indices]
    batch = {'feats': self.train_feats(indices, images, step), 'tokens': self.tokens[indices]}
    if self.scene_weight:
      batch['scene_label'] = self.scene_labels['train'][images]
    return batch

  def train_feats(self, indices: np.ndarray, images: np.ndarray, step: int) -> np.ndarray:
    """Float32 features of the train images `images` for the examples `indices` at global step `step`.

    With config.data.dihedral_train each example reads the transform dihedral_choice gives it this epoch.
    """
    if not self.train_views:
      return self.feats['train'][images].astype(np.float32)
    epoch = step // max(self.num_train // self.config.batch_size, 1)
    choice = dihedral_choice(self.config.seed, epoch, self.num_train)[indices]
    out = np.empty((len(indices), *self.feats['train'].shape[1:]), np.float32)
    for transform in np.unique(choice):
      picked = choice == transform
      out[picked] = self.train_views[transform][images[picked]].astype(np.float32)
    return out

  @staticmethod
  def metrics(loss, aux, grads) -> dict:
    scene = {k: aux[k] for k in ('scene_loss', 'scene_correct') if k in aux}
    return {
      'loss': loss,
      'grad_norm': optax.tree.norm(grads),
      'num_tokens': aux['num_tokens'],
      'loss_weight': aux['num_tokens'],
      **scene,
    }  # the epoch loss is a mean over tokens, not over batches

  def _decode_fn(self, beam_size: int = 1, length_penalty: float = 1.0, whole_beam: bool = False):
    """Jitted decoding: greedy for beam_size 1, else beam search (compiled once per setting).

    whole_beam (beam_size > 1): the search returns its final beam (beam_search's return_beam) instead of the best.
    """
    whole_beam = whole_beam and beam_size > 1
    key = (1, 0.0) if beam_size == 1 else (beam_size, float(length_penalty))
    key = (*key, 'beam') if whole_beam else key
    if key not in self._decoders:
      kwargs = dict(
        bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, max_len=self.config.decoding.max_len, ensemble=self.ensemble
      )
      if beam_size == 1:
        fn = lambda params, feats: decoders.greedy_decode(self.model, params, feats, **kwargs)[0]
      else:
        fn = lambda params, feats: decoders.beam_search(
          self.model,
          params,
          feats,
          beam_size=beam_size,
          length_penalty=length_penalty,
          return_beam=whole_beam,
          **kwargs,
        )
      # Replicated output: every process reads all the tokens (it cannot read other processes' shards).
      self._decoders[key] = memory.CheckedJit(
        fn,
        knob='eval_batch_size',
        value=self.config.eval_batch_size,
        what='greedy decoding' if beam_size == 1 else f'beam-{beam_size} decoding',
        out_shardings=parallel.replicated(self.mesh),
        compiler_options=self._eval_options,
      )
    return self._decoders[key]

  def _configured_decoding(self) -> tuple[int, float, int, bool]:
    """(beam_size, length_penalty, rerank_neighbours, rerank_template) of config.decoding.

    Beam size 1 is greedy (no reranking); the template joins the candidates only when reranking.
    """
    d = self.config.decoding
    if d.method != 'beam' or d.beam_size == 1:
      return (1, d.length_penalty, 0, False)
    k = d.get('rerank_neighbours', 0)
    return (d.beam_size, d.length_penalty, k, bool(k) and self._template_allowed(d.get('rerank_template', False)))

  def _template_allowed(self, template: bool) -> bool:
    """The class template joins reranking only where there is a scene head to predict the class."""
    return bool(template) and bool(self.scene_classes)

  def _decoding_candidates(self) -> list[tuple[int, float, int, bool]]:
    """The decodings tried on val, or [] to use config.decoding.

    val_beam_sizes x val_length_penalties x val_rerank x val_rerank_template: beam size 1 once, the template only
    with reranking.
    """
    d = self.config.decoding
    sizes = tuple(d.get('val_beam_sizes') or ())
    penalties = tuple(d.get('val_length_penalties') or ()) or (d.length_penalty,)
    reranks = tuple(d.get('val_rerank') or ()) or (d.get('rerank_neighbours', 0),)
    templates = tuple(d.get('val_rerank_template') or ()) or (d.get('rerank_template', False),)
    return sorted(
      {
        (1, 0.0, 0, False) if b == 1 else (b, float(lp), int(r), bool(r) and self._template_allowed(t))
        for b in sizes
        for lp in penalties
        for r in reranks
        for t in templates
      }
    )

  def _reranking(self) -> bool:
    """Whether config.decoding may rerank beam candidates (rerank_neighbours or val_rerank above 0)."""
    d = self.config.decoding
    return bool(d.get('rerank_neighbours', 0)) or any(d.get('val_rerank') or ())

  def _templates_tried(self) -> bool:
    """Whether the class template may join the reranked candidates (rerank_template or val_rerank_template)."""
    d = self.config.decoding
    return self._template_allowed(d.get('rerank_template', False) or any(d.get('val_rerank_template') or ()))

  def check_memory(self, params) -> None:
    """Compiles greedy decoding (and the test decodings) for eval_batch_size; one line if one cannot fit."""
    b = self.config.eval_batch_size
    feats = {'feats': np.zeros((1, *self.feats['val'].shape[1:]), np.float32)}
    spec = parallel.abstract_batch(feats, b, self.mesh)['feats']
    settings = {(1, 0.0, False)}
    for beam_size, length_penalty, rerank, _ in (self._configured_decoding(), *self._decoding_candidates()):
      settings.add((beam_size, length_penalty, bool(rerank) and beam_size > 1))
    for setting in settings:
      self._decode_fn(*setting).check(params, spec, host_bytes=b * feats['feats'].nbytes)

  def decode(
    self,
    params,
    split: str,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    rerank_neighbours: int = 0,
    rerank_template: bool = False,
  ) -> list[list[str]]:
    """Captions (word lists) for every image of a split: greedy, or beam search for beam_size > 1.

    rerank_neighbours = k > 0 (beam search only): the caption is the final beam's candidate that
    consensus_rerank picks (with rerank_template, the predicted class's consensus caption is a candidate too).
    """
    if rerank_neighbours and beam_size > 1:
      return self.consensus_rerank(params, split, beam_size, length_penalty, rerank_neighbours, rerank_template)
    fn = self._decode_fn(beam_size, length_penalty)
    feats = self.feats[split]
    fetch = lambda rows: {'feats': feats[rows].astype(np.float32)}
    out = []
    for batch, n in parallel.padded_batches(len(feats), self.config.eval_batch_size, fetch):
      tokens = np.asarray(fn(params, parallel.shard_batch({'feats': batch['feats']}, self.mesh)['feats']))[:n]
      out.extend(self.vocab.decode(row.tolist()) for row in tokens)
    return out

  def decode_beams(
    self, params, split: str, beam_size: int, length_penalty: float
  ) -> tuple[list[list[list[str]]], np.ndarray, np.ndarray]:
    """Per image of a split, the final beam's captions best first; their summed log-probs and lengths (N x K)."""
    fn = self._decode_fn(beam_size, length_penalty, whole_beam=True)
    feats = self.feats[split]
    fetch = lambda rows: {'feats': feats[rows].astype(np.float32)}
    captions, logprobs, lengths = [], [], []
    for batch, n in parallel.padded_batches(len(feats), self.config.eval_batch_size, fetch):
      tokens_BxKxL, logp_BxK, length_BxK = fn(
        params, parallel.shard_batch({'feats': batch['feats']}, self.mesh)['feats']
      )
      captions.extend([self.vocab.decode(row.tolist()) for row in beam] for beam in np.asarray(tokens_BxKxL)[:n])
      logprobs.append(np.asarray(logp_BxK, np.float64)[:n])
      lengths.append(np.asarray(length_BxK)[:n])
    return captions, np.concatenate(logprobs), np.concatenate(lengths)

  def consensus_rerank(
    self,
    params,
    split: str,
    beam_size: int,
    length_penalty: float,
    rerank_neighbours: int,
    rerank_template: bool = False,
  ) -> list[list[str]]:
    """Per image, the final beam's caption with the best consensus with its nearest training images' captions.

    captioning.rerank.rerank on the mean-pooled features decoding reads (the mean of the 8 dihedral views
    with config.data.dihedral_test) against the training pool of the nearest-neighbour baseline (_train_pool),
    among the training images of the scene head's predicted class when there is a head; CIDEr-D document
    frequencies from the training references; config.decoding.rerank_weight mixes in log p / len.
    rerank_template (with a scene head): the consensus caption of the image's predicted class among the
    training captions (the class-template baseline's caption) joins the beam's candidates.
    """
    cached = self._beams_cache  # val selection tries several k on the same beams: search once
    if cached is None or cached[0] is not params or cached[1:4] != (split, beam_size, length_penalty):
      cached = (params, split, beam_size, length_penalty, self.decode_beams(params, split, beam_size, length_penalty))
      self._beams_cache = cached
    captions, logprobs, lengths = cached[4]
    scorer, train_features, train_references = self._rerank_train_inputs()
    if split not in self._rerank_inputs:
      self._rerank_inputs[split] = _mean_pooled(self.feats[split])
    classes = self.predicted_scenes(params, split)
    templates = None
    if rerank_template and classes is not None:
      consensus = self.class_templates()
      templates = [consensus.get(c) for c in classes]  # None: a class with no training image (never predicted)
    chosen = rerank_lib.rerank(
      scorer,
      captions,
      self._rerank_inputs[split],
      train_features,
      train_references,
      rerank_neighbours,
      train_labels=None if classes is None else self.scene_labels['train'],
      classes=classes,
      logprobs=logprobs,
      lengths=lengths,
      weight=self.config.decoding.get('rerank_weight', 0.0),
      extra=templates,
    )
    changed, k = sum(c != 0 for c in chosen), rerank_neighbours
    # Index len(beam) is the image's template (rerank's extra candidate).
    picked = [beam[c] if c < len(beam) else templates[i] for i, (beam, c) in enumerate(zip(captions, chosen))]
    from_template = sum(c == len(beam) for beam, c in zip(captions, chosen))
    logging.info(
      "consensus rerank on %s, k=%d%s: %d of %d captions differ from the beam's%s",
      split,
      k,
      ' + class template' if templates is not None else '',
      changed,
      len(chosen),
      f' ({from_template} are the template)' if templates is not None else '',
    )
    return picked

  def _rerank_train_inputs(self) -> tuple:
    """(CIDEr-D scorer with the training references' document frequencies, training pool, training references)."""
    if 'train' not in self._rerank_inputs:  # built once: nothing here depends on the params
      train_references = vocab_lib.references(self.entries['train'])
      self._rerank_inputs['train'] = (metrics_lib.CiderD(train_references), self._train_pool()[0], train_references)
    return self._rerank_inputs['train']

  def class_templates(self) -> dict:
    """Scene class index -> its consensus caption among the training captions (the class-template baseline's)."""
    if 'templates' not in self._rerank_inputs:
      scorer, _, train_references = self._rerank_train_inputs()
      self._rerank_inputs['templates'] = baselines_lib.class_consensus(
        scorer, train_references, self.scene_labels['train']
      )
    return self._rerank_inputs['templates']

  def template_fallback(self, params, setting: tuple) -> tuple[set, dict]:
    """The predicted classes whose consensus caption beats the chosen decoding on VAL, and the val scores.

    Per class the scene head predicts on val, the mean per-image score (the selection metric's: CIDEr-D,
    sentence BLEU-4 or ROUGE-L; CIDEr-D for BLEU-1..3) of the decoded captions and of the class's consensus
    training caption over the val images predicted as that class; the template replaces the decoding for the
    classes where it is strictly better. Returns (class indices, {class name: {'decoded', 'template', 'images'}}).
    """
    cached = self._val_decoded  # _choose_decoding's captions of this setting, when it decoded them
    if cached is not None and cached[0] is params and cached[1] == setting:
      hyps = cached[2]
    else:
      hyps = self.decode(params, 'val', *setting)
    classes = self.predicted_scenes(params, 'val')
    consensus = self.class_templates()
    metric = self.selection_metric if self.selection_metric in ('cider', 'bleu4', 'rouge_l') else 'cider'
    names = [self.scene_classes[c] for c in classes]
    per_class = lambda captions: distinct.per_class_mean(
      self._scores('val', captions, per_image=True)['per_image'][metric], names
    )
    decoded, template = per_class(hyps), per_class([consensus[c] for c in classes])
    table = {
      name: {'decoded': decoded[name], 'template': template[name], 'images': names.count(name)} for name in decoded
    }
    chosen = {c for c in set(classes.tolist()) if template[self.scene_classes[c]] > decoded[self.scene_classes[c]]}
    logging.info(
      'template fallback (val %s per class): the template for %s',
      metric,
      ', '.join(self.scene_classes[c] for c in sorted(chosen)) or 'no class',
    )
    return chosen, table

  def predicted_scenes(self, params, split: str) -> np.ndarray | None:
    """The scene head's predicted class index (argmax) for each image of a split; None without a head."""
    if not self.scene_classes:
      return None
    if 'scene' not in self._decoders:
      probs = lambda p, f: jax.nn.softmax(self.model.apply({'params': p}, f, method='scene_logits'), axis=-1)
      fn = (lambda p, f: jax.vmap(probs, in_axes=(0, None))(p, f).mean(0)) if self.ensemble else probs
      self._decoders['scene'] = jax.jit(
        fn, out_shardings=parallel.replicated(self.mesh), compiler_options=self._eval_options
      )
    feats = self.feats[split]
    fetch = lambda rows: {'feats': feats[rows].astype(np.float32)}
    predicted = []
    for batch, n in parallel.padded_batches(len(feats), self.config.eval_batch_size, fetch):
      probs_BxS = self._decoders['scene'](params, parallel.shard_batch({'feats': batch['feats']}, self.mesh)['feats'])
      predicted.append(np.asarray(probs_BxS)[:n].argmax(-1))
    return np.concatenate(predicted)

  def scene_accuracy(self, params, split: str) -> float | None:
    """The scene head's accuracy on a split's images (the features decoding reads); None without a head.

    Images whose class is not a training class count as wrong.
    """
    predicted = self.predicted_scenes(params, split)
    return None if predicted is None else float(np.mean(predicted == self.scene_labels[split]))

  def _scores(self, split: str, hypotheses: list[list[str]], *, meteor: bool = False, per_image: bool = False) -> dict:
    """BLEU-1..4, mean sentence BLEU-4, ROUGE-L, CIDEr-D (and METEOR) of the split's captions."""
    return metrics_lib.caption_scores(self.references[split], hypotheses, meteor=meteor, per_image=per_image)

  def evaluate(self, params, split: str) -> dict[str, float]:
    scores = self._scores(split, self.decode(params, split))
    if self.scene_classes:
      scores['scene_accuracy'] = self.scene_accuracy(params, split)
    return scores

  def save_assets(self, workdir: str) -> None:
    self.vocab.save(os.path.join(workdir, VOCAB_FILE))  # config.json: written by the trainer for every task
    if self.scene_classes:
      io_utils.write_json(os.path.join(workdir, SCENE_CLASSES_FILE), self.scene_classes)

  def _choose_decoding(self, params) -> tuple[tuple[int, float, int, bool], list[dict]]:
    """The (beam size, length penalty, rerank neighbours, template) best on VAL, and every score tried."""
    candidates = self._decoding_candidates()
    if not candidates:
      return self._configured_decoding(), []
    metric = self.selection_metric
    tried, captions = [], []
    for beam_size, length_penalty, rerank, template in candidates:
      captions.append(self.decode(params, 'val', beam_size, length_penalty, rerank, template))
      value = self._scores('val', captions[-1])[metric]
      row = {'beam_size': beam_size, 'length_penalty': length_penalty}
      if self._reranking():
        row['rerank_neighbours'] = rerank
        if self._templates_tried():
          row['rerank_template'] = template
      tried.append({**row, f'val_{metric}': value})
      logging.info(
        'decoding on val: beam %d, length penalty %.2f, rerank k=%d%s: %s %.4f',
        beam_size,
        length_penalty,
        rerank,
        ' + template' if template else '',
        metric,
        value,
      )
    i = max(range(len(tried)), key=lambda j: tried[j][f'val_{metric}'])  # first of equals: smaller beam, no rerank
    self._val_decoded = (params, candidates[i], captions[i])  # template_fallback reads the same captions
    return candidates[i], tried

  def final_results(self, params, best_params, workdir: str) -> dict:
    """Test metrics (METEOR too) of the best epoch's parameters with the test decoding (and greedy).

    The test decoding is config.decoding's, or, when config.decoding.val_beam_sizes is set, the beam size,
    length penalty (and with val_rerank the reranking neighbours) that score best on val (the selection
    metric): never chosen on test. With config.decoding.template_fallback and a scene head, the images of the
    predicted classes where the class template beat that decoding on val get the template (template_fallback).
    """
    del params
    (beam_size, length_penalty, rerank, template), tried = self._choose_decoding(best_params)
    hyps = self.decode(best_params, 'test', beam_size, length_penalty, rerank, template)
    fallback = None
    if self.config.decoding.get('template_fallback', False) and self.scene_classes:
      fallback = self.template_fallback(best_params, (beam_size, length_penalty, rerank, template))
      consensus = self.class_templates()
      test_classes = self.predicted_scenes(best_params, 'test')
      hyps = [consensus[c] if c in fallback[0] else h for h, c in zip(hyps, test_classes)]
    scores = self._scores('test', hyps, meteor=self.config.get('meteor_at_test', True), per_image=True)
    per_image = scores.pop('per_image')
    results = {f'test_{k}': v for k, v in scores.items()}
    train_captions = (c for e in self.entries['train'] for c in e.captions)
    results.update({f'test_{k}': v for k, v in distinct.distinctiveness(hyps, train_captions).items()})
    labels = self.labels('test')
    if labels is not None:
      # The mean of the per-image CIDEr-D (document frequencies from all test references) over each class.
      results['test_cider_per_class'] = distinct.per_class_mean(per_image['cider'], labels)
    results['decoding'] = {
      'method': 'greedy' if beam_size == 1 else 'beam',
      'beam_size': beam_size,
      'max_len': self.config.decoding.max_len,
      'length_penalty': length_penalty,
    }
    if self._reranking():
      results['decoding']['rerank_neighbours'] = rerank  # 0: the beam's own best caption
      results['decoding']['rerank_weight'] = self.config.decoding.get('rerank_weight', 0.0)
      results['decoding']['rerank_classes'] = 'predicted' if self.scene_classes else 'all'
      if self._templates_tried():
        results['decoding']['rerank_template'] = template  # the class's consensus caption was a candidate
    if fallback is not None:
      results['decoding']['template_fallback'] = {
        'classes': sorted(self.scene_classes[c] for c in fallback[0]),
        'val_per_class': fallback[1],
      }
    if tried:
      results['decoding']['chosen_on_val_from'] = tried
    if beam_size != 1:
      greedy = self._scores('test', self.decode(best_params, 'test'))
      results.update({f'test_greedy_{k}': v for k, v in greedy.items()})
    results['dataset'] = 'synthetic' if self.synthetic else self.config.data.dir
    results['num_images'] = {s: len(self.entries[s]) for s in ('train', 'val', 'test')}
    results['vocab_size'] = len(self.vocab)
    if self.scene_classes:
      results['scene_classes'] = self.scene_classes
      results['val_scene_accuracy'] = self.scene_accuracy(best_params, 'val')
      results['test_scene_accuracy'] = self.scene_accuracy(best_params, 'test')
    captions = caption_rows(self.entries['test'], self.references['test'], hyps, per_image)
    alphas = self.attention_maps(best_params, 'test', hyps)
    if parallel.is_main_process():
      io_utils.write_json(os.path.join(workdir, CAPTIONS_FILE), captions)
      if alphas is not None:
        lengths = np.array([len(a) for a in alphas], np.int32)
        arrays = {
          'image_name': np.array([e.name for e in self.entries['test']]),
          'length': lengths,
          'alphas': np.concatenate(alphas).astype(np.float16),
        }
        io_utils.atomic_write(os.path.join(workdir, ATTENTION_FILE), lambda f: np.savez_compressed(f, **arrays))
    return results

  def attention_maps(self, params, split: str, hyps: list[list[str]]) -> list[np.ndarray] | None:
    """Per image, the attention (steps x N) that chose each word of its caption and then the end.

    steps is len(words) + 1, or len(words) for a caption cut at decoding.max_len (it has no end). The decoder
    reads the generated caption teacher-forced, so the maps are those the decoding used, beam search
    included. None for a decoder without attention or an ensemble.
    """
    if self.config.model.attention_dim is None or self.ensemble:
      return None
    width = max(len(h) for h in hyps) + 1
    inputs = np.full((len(hyps), width), decoders.PAD_ID, np.int32)
    inputs[:, 0] = self.vocab.bos_id
    for i, hyp in enumerate(hyps):
      inputs[i, 1 : len(hyp) + 1] = self.vocab.encode(hyp)
    if 'teacher_forced_alphas' not in self._decoders:
      self._decoders['teacher_forced_alphas'] = jax.jit(
        lambda p, f, x: self.model.apply({'params': p}, f, x, train=False)[1],
        out_shardings=parallel.replicated(self.mesh),
        compiler_options=self._eval_options,
      )
    fn, feats = self._decoders['teacher_forced_alphas'], self.feats[split]
    fetch = lambda rows: {'feats': feats[rows].astype(np.float32), 'tokens': inputs[rows]}
    out = []
    for batch, n in parallel.padded_batches(len(hyps), self.config.eval_batch_size, fetch):
      batch = parallel.shard_batch({'feats': batch['feats'], 'tokens': batch['tokens']}, self.mesh)
      out.append(np.asarray(fn(params, batch['feats'], batch['tokens']), np.float32)[:n])
    alphas_MxTxN = np.concatenate(out)
    max_len = self.config.decoding.max_len
    return [alphas_MxTxN[i, : min(len(h) + 1, max_len)] for i, h in enumerate(hyps)]

  def tensorboard_images(self, params, num_images: int = 3) -> dict[str, np.ndarray]:
    """Greedy captions with their attention maps for the first validation images (attention decoders)."""
    if self.config.model.attention_dim is None:
      return {}
    if 'attention' not in self._decoders:
      d = self.config.decoding
      self._decoders['attention'] = jax.jit(
        lambda p, f: decoders.greedy_decode(
          self.model, p, f, bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, max_len=d.max_len
        ),
        compiler_options=self._eval_options,
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


BASELINES_FILE = 'baselines.json'
BASELINE_CAPTIONS_FILE = 'baselines_captions.json'
BASELINE_WORKDIRS = 'baselines'  # workdir/baselines/NAME: one workdir per captioning baseline


def write_baseline_workdirs(
  workdir: str,
  config: dict,
  entries: list[captions_lib.ImageEntry],
  references: metrics_lib.References,
  results: baselines_lib.BaselineResults,
) -> list[str]:
  """workdir/baselines/NAME per baseline with test captions: what a captioning run writes for comparisons.

  Each holds test_captions.json (caption_rows, as every captioning run writes it), results.json (the
  baseline's scores under a captioner's metric names, its name and the config) and config.json. A run
  compares with one by `python -m cnn_caption.captioning.compare RUN workdir/baselines/NAME` or
  `launch.py --mode=compare --workdir=RUN --compare_to=workdir/baselines/NAME`. `human` has none: it has no
  single caption per image.

  Args:
    workdir: the baselines' workdir.
    config: the resolved config as a dict, its data folder one that holds the images (the report's thumbnails).
    entries: the test images, in the order of the baselines' captions.
    references: their reference captions (token lists).
    results: run_baselines' results.

  Returns:
    The folders written.
  """
  labels = [e.category for e in entries]
  out = []
  for name, captions in results.captions.items():
    directory = os.path.join(workdir, BASELINE_WORKDIRS, name)
    os.makedirs(directory, exist_ok=True)
    per_image = results.per_image[name]
    io_utils.write_json(os.path.join(directory, CAPTIONS_FILE), caption_rows(entries, references, captions, per_image))
    summary = {'baseline': name, **results.scores[name], 'num_images': {'test': len(entries)}, 'config': config}
    if None not in labels:
      summary['test_cider_per_class'] = distinct.per_class_mean(per_image['cider'], labels)
    io_utils.write_json(os.path.join(directory, 'results.json'), summary)
    io_utils.write_json(os.path.join(directory, CONFIG_FILE), config)
    out.append(directory)
  return out


def run_baselines(config: ml_collections.ConfigDict, workdir: str) -> baselines_lib.BaselineResults:
  """The captioning baselines (captioning.baselines) on this config's data and encoder features; no training.

  The data, vocabulary and feature cache are built exactly as training builds them, and the baselines see the
  features a captioner of this config reads (CaptioningTask.baseline_data: the dihedral views and means with
  config.data.dihedral_train / dihedral_test). Writes workdir/baselines.json ({baseline: {metric: value}};
  `features`, a string, says which features the feature-based ones used), workdir/baselines_captions.json
  (the consensus caption of each class and every baseline's test captions) and write_baseline_workdirs'
  folders. METEOR as config.meteor_at_test says.
  """
  os.makedirs(workdir, exist_ok=True)
  task = CaptioningTask(config, workdir, parallel.make_mesh())
  data = task.baseline_data()
  results = baselines_lib.run_baselines(data, meteor=config.get('meteor_at_test', True))
  labels = task.labels('test')
  rows = []
  for i, entry in enumerate(task.entries['test']):
    row = {'image_name': entry.name, **{name: captions[i] for name, captions in results.captions.items()}}
    if labels is not None:
      row['class'] = labels[i]
    rows.append(row)
  if parallel.is_main_process():
    io_utils.write_json(os.path.join(workdir, BASELINES_FILE), results.scores)
    io_utils.write_json(
      os.path.join(workdir, BASELINE_CAPTIONS_FILE), {'consensus_by_class': results.consensus, 'test': rows}
    )
    saved = config.to_dict()
    if config.data.dir is None:  # the synthetic scenes: where they are, not where a baseline's folder would put them
      saved['data']['synthetic_dir'] = os.path.abspath(synthetic_dir(config, workdir))
    write_baseline_workdirs(workdir, saved, task.entries['test'], data.references['test'], results)
  return results
