"""Captioning baselines that train no decoder: what a captioner's scores should be read against.

Four baselines, each scored on the test images with every metric the project reports (the names of
results.json: `test_bleu1`..`test_bleu4`, `test_bleu4_sentence_mean`, `test_rouge_l`, `test_cider`,
`test_meteor`) and with the distinctiveness figures of `distinct` (`test_copied_fraction`,
`test_distinct_captions`, `test_vocab_used`):

- `class_oracle` (data with classes only): every test image gets the consensus caption of its TRUE class.
  A class's consensus caption is the training caption (one caption instance among the class's training
  images' captions) with the highest mean CIDEr-D against every other caption instance of that class, each
  taken as a single reference; an identical caption written for another image (or the same image) counts
  as another instance. The first of equals in data order wins.
- `linear_probe` (data with classes only): multinomial logistic regression on the standardised train rows
  (`probe_rows`: one per training image, or one per image and dihedral view; train mean and standard
  deviation; a constant feature is left centred) with an unregularised bias, `PROBE_STEPS` steps of
  full-batch L-BFGS (optax) on mean cross-entropy + l2 / 2 * |W|^2, l2 chosen from `L2_GRID` by val class
  accuracy (ties: the larger l2). The predicted class's consensus caption is the test image's caption. Its
  val and test class accuracies are reported beside the caption metrics.
- `nearest_neighbour`: the k most similar training images by cosine similarity of the features (raw, not
  standardised), among the training images of the probe's predicted class when the data has classes.
  Their captions are the candidates; each candidate's consensus is its mean CIDEr-D against the other
  candidate caption instances as single references; the highest wins (the first of equals, neighbours in
  order of similarity).
- `human`: in round j, each test image's j-th reference is the hypothesis and its other references are the
  references; the metrics are averaged over the rounds (as many as the fewest references of a test image).
  CIDEr-D's document frequencies come, as everywhere in the project's test scores, from the references
  being scored: here the held-out-one references of the test images. `test_cider_df_all_references`
  gives CIDEr-D with document frequencies from all references of the test images instead.

The consensus scores above (class and nearest-neighbour) use CIDEr-D with document frequencies from the
TRAINING references (one document per training image), so no test caption informs a choice.

Features are those the captioner reads (BaselineData): with dihedral training views (`train_views`), the
probe trains on every view of every training image (labels repeated) and the nearest-neighbour pool is each
training image's mean over its views (one row per image, so neighbours are images); val and test are as
given (the task gives the features decoding reads). `linear_probe` and `nearest_neighbour` name them in a
string field `features` beside their metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_caption.captioning import distinct
from cnn_caption.captioning import metrics as metrics_lib

NAMES = ('class_oracle', 'linear_probe', 'nearest_neighbour', 'human')
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # strengths tried for the probe's weights
PROBE_STEPS = 300  # full-batch L-BFGS steps per strength
NUM_NEIGHBOURS = 10  # training images whose captions are the nearest-neighbour candidates

Caption = Sequence[str]


@dataclasses.dataclass(frozen=True)
class BaselineData:
  """One data set's splits as the captioner sees them.

  references: split ('train', 'val', 'test') -> per image, its reference captions (token lists).
  features: split -> N x C float array: each image's region features of the run's encoder, mean-pooled
    (with train_views, features['train'] is their mean over the views: the nearest-neighbour pool).
  labels: split -> per image, its class; None when the data has no classes.
  train_views: V x N x C, each training image's mean-pooled features under each of V transforms (the 8
    dihedral views a captioner with config.data.dihedral_train trains on): the linear probe's rows; None
    for one view per image.
  feature_note: what the features are, recorded beside the feature-based baselines' scores.
  """

  references: dict[str, metrics_lib.References]
  features: dict[str, np.ndarray]
  labels: dict[str, list[str]] | None = None
  train_views: np.ndarray | None = None
  feature_note: str = 'encoder features, mean over regions'


@dataclasses.dataclass
class BaselineResults:
  """What run_baselines found."""

  scores: dict[str, dict[str, float | str]] = dataclasses.field(default_factory=dict)  # baseline -> {metric: value}
  captions: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)  # baseline -> test captions
  # baseline -> metrics.caption_scores' per-image scores of its test captions ({'cider': [...], ...})
  per_image: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
  consensus: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # class -> its consensus caption
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # baseline -> why it did not run


def consensus_index(scorer: metrics_lib.CiderD, captions: Sequence[Caption]) -> int:
  """Index of the caption with the highest mean CIDEr-D against the other caption instances (first of equals).

  Identical captions are scored once: caption u's total against all instances is sum_v count_v * S[u, v],
  from which its own instance, S[u, u], is taken away.
  """
  if not captions:
    raise ValueError('no captions to choose a consensus from')
  if len(captions) == 1:
    return 0
  keys = [tuple(w.lower() for w in c) for c in captions]
  unique = list(dict.fromkeys(keys))
  position = {k: i for i, k in enumerate(unique)}
  counts = np.bincount([position[k] for k in keys], minlength=len(unique)).astype(np.float64)
  pairwise = scorer.pairwise_scores(unique)
  mean = (pairwise @ counts - np.diag(pairwise)) / (len(captions) - 1)
  best = unique[int(np.argmax(mean))]
  return keys.index(best)


def class_consensus(
  scorer: metrics_lib.CiderD, references: metrics_lib.References, labels: Sequence[str]
) -> dict[str, list[str]]:
  """class -> the consensus caption among all captions of that class's images (classes sorted by name)."""
  out = {}
  for label in sorted(set(labels)):
    captions = [c for refs, lab in zip(references, labels) if lab == label for c in refs]
    out[label] = list(captions[consensus_index(scorer, captions)])
  return out


@functools.partial(jax.jit, static_argnames='steps')
def _fit_softmax_regression(x_NxD, onehot_NxC, l2, *, steps: int):
  """Weights and bias of mean cross-entropy + l2 / 2 * |W|^2 after `steps` full-batch L-BFGS steps."""

  def loss(params):
    logits_NxC = x_NxD @ params['w'] + params['b']
    return optax.softmax_cross_entropy(logits_NxC, onehot_NxC).mean() + 0.5 * l2 * jnp.sum(params['w'] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  params = {
    'w': jnp.zeros((x_NxD.shape[1], onehot_NxC.shape[1]), jnp.float32),
    'b': jnp.zeros((onehot_NxC.shape[1],), jnp.float32),
  }

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
  return params


@dataclasses.dataclass
class LinearProbe:
  """A fitted softmax regression over standardised features."""

  classes: list[str]
  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray
  bias: np.ndarray
  l2: float
  val_accuracy: float

  def predict(self, features: np.ndarray) -> list[str]:
    logits = ((np.asarray(features, np.float32) - self.mean) / self.scale) @ self.weights + self.bias
    return [self.classes[i] for i in np.argmax(logits, axis=1)]


def fit_linear_probe(
  train_features: np.ndarray,
  train_labels: Sequence[str],
  val_features: np.ndarray,
  val_labels: Sequence[str],
  l2_grid: Sequence[float] = L2_GRID,
  steps: int = PROBE_STEPS,
) -> LinearProbe:
  """Softmax regression on train, its l2 strength chosen by val accuracy (ties: the larger l2)."""
  x = np.asarray(train_features, np.float32)
  classes = sorted(set(train_labels))
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  index = {c: i for i, c in enumerate(classes)}
  onehot = np.eye(len(classes), dtype=np.float32)[[index[c] for c in train_labels]]
  best = None
  for l2 in l2_grid:
    params = _fit_softmax_regression(jnp.asarray((x - mean) / scale), jnp.asarray(onehot), l2, steps=steps)
    probe = LinearProbe(classes, mean, scale, np.asarray(params['w']), np.asarray(params['b']), float(l2), 0.0)
    probe.val_accuracy = accuracy(probe.predict(val_features), val_labels)
    logging.info('linear probe: l2 %g, val class accuracy %.4f', l2, probe.val_accuracy)
    if best is None or (probe.val_accuracy, probe.l2) > (best.val_accuracy, best.l2):
      best = probe
  return best


def accuracy(predicted: Sequence[str], labels: Sequence[str]) -> float:
  return float(np.mean([p == t for p, t in zip(predicted, labels, strict=True)]))


def nearest_training_images(
  train_features: np.ndarray,
  features: np.ndarray,
  k: int,
  train_labels: Sequence | None = None,
  classes: Sequence | None = None,
) -> list[np.ndarray]:
  """Per image (a row of features), the indices of its k most similar training images, most similar first.

  Cosine similarity of the feature rows (ties: the earlier training image first). With train_labels and
  classes, only training images whose label equals the image's class are neighbours.
  """

  def unit(v):
    v = np.asarray(v, np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)

  similarity = unit(features) @ unit(train_features).T
  train_labels_array = None if train_labels is None else np.asarray(train_labels, dtype=object)
  out = []
  for i, row in enumerate(similarity):
    pool = np.arange(len(row)) if classes is None else np.flatnonzero(train_labels_array == classes[i])
    if not len(pool):
      raise ValueError(f'image {i}: class {classes[i]!r} has no training image')
    out.append(pool[np.argsort(-row[pool], kind='stable')[:k]])
  return out


def nearest_neighbour_captions(
  scorer: metrics_lib.CiderD,
  train_features: np.ndarray,
  train_references: metrics_lib.References,
  test_features: np.ndarray,
  k: int = NUM_NEIGHBOURS,
  train_labels: Sequence[str] | None = None,
  test_classes: Sequence[str] | None = None,
) -> list[list[str]]:
  """Per test image, the consensus caption of its k most similar training images (cosine similarity).

  With train_labels and test_classes, only training images of the test image's class are neighbours.
  """
  out = []
  for neighbours in nearest_training_images(train_features, test_features, k, train_labels, test_classes):
    candidates = [c for j in neighbours for c in train_references[j]]
    out.append(list(candidates[consensus_index(scorer, candidates)]))
  return out


def probe_rows(data: BaselineData) -> tuple[np.ndarray, list[str]]:
  """The linear probe's training rows and their labels: one per training image, or one per image and view.

  With data.train_views (V x N x C) the rows are view-major (row v * N + i is image i under view v) and the
  labels repeat V times.
  """
  if data.train_views is None:
    return data.features['train'], list(data.labels['train'])
  views = np.asarray(data.train_views)
  num_images = len(data.references['train'])
  if views.ndim != 3 or views.shape[1] != num_images:
    raise ValueError(f'train_views has shape {views.shape}; expected views x {num_images} training images x C')
  return views.reshape(-1, views.shape[-1]), list(data.labels['train']) * len(views)


def _scored(references, hypotheses, train_captions, meteor: bool) -> tuple[dict[str, float], dict[str, list]]:
  """The test_ metrics and distinctiveness figures of the hypotheses, and metrics.caption_scores' per-image scores."""
  scores = metrics_lib.caption_scores(references, hypotheses, meteor=meteor, per_image=True)
  per_image = scores.pop('per_image')
  scores.update(distinct.distinctiveness(hypotheses, train_captions))
  return {f'test_{name}': value for name, value in scores.items()}, per_image


def human_scores(
  test_references: metrics_lib.References, train_captions: Sequence[Caption], meteor: bool
) -> dict[str, float]:
  """Each reference against the image's other references, every metric averaged over the rounds."""
  rounds = min(len(refs) for refs in test_references)
  if rounds < 2:
    raise ValueError('every test image needs at least 2 references')
  all_refs_cider = metrics_lib.CiderD(test_references)
  per_round = []
  for j in range(rounds):
    hyps = [refs[j] for refs in test_references]
    others = [[r for i, r in enumerate(refs) if i != j] for refs in test_references]
    scores, _ = _scored(others, hyps, train_captions, meteor)
    scores['test_cider_df_all_references'] = float(all_refs_cider.scores(others, hyps).mean())
    per_round.append(scores)
  return {name: float(np.mean([s[name] for s in per_round])) for name in per_round[0]}


def _all_labelled(data: BaselineData) -> str | None:
  """Why the class-based baselines cannot run, or None when they can."""
  if data.labels is None:
    return 'the data set has no classes (no "class" field in dataset.json)'
  for split in ('train', 'val', 'test'):
    if len(data.labels.get(split, ())) != len(data.references[split]):
      return f'the {split} split has no class for every image'
  missing = sorted(set(data.labels['test']) - set(data.labels['train']))
  if missing:
    return f'test class(es) {missing[:3]} have no training image'
  return None


def run_baselines(data: BaselineData, *, meteor: bool = True, k: int = NUM_NEIGHBOURS) -> BaselineResults:
  """Every baseline that the data allows, scored on test; the others in `skipped` with the reason (logged).

  Args:
    data: references, mean-pooled features (and dihedral train views) and (optionally) classes of train,
      val and test.
    meteor: also compute METEOR (a Java process per scoring, about 20 s on 210 images).
    k: neighbours of the nearest-neighbour baseline.

  Returns:
    BaselineResults: scores per baseline (plus the probe's class accuracies and l2, and `features` for the
    feature-based ones), test captions and their per-image scores per baseline, the consensus caption per
    class, and the skipped baselines.
  """
  refs = data.references
  train_captions = [c for image_refs in refs['train'] for c in image_refs]
  scorer = metrics_lib.CiderD(refs['train'])
  out = BaselineResults()

  def score(name: str, captions: list[list[str]], **extra) -> None:
    out.captions[name] = captions
    out.scores[name], out.per_image[name] = _scored(refs['test'], captions, train_captions, meteor)
    out.scores[name].update(extra)

  no_classes = _all_labelled(data)
  predicted = None
  if no_classes is None:
    labels = data.labels
    out.consensus = class_consensus(scorer, refs['train'], labels['train'])
    for label, caption in out.consensus.items():
      logging.info('consensus caption of class %s: %s', label, ' '.join(caption))
    score('class_oracle', [out.consensus[c] for c in labels['test']])
    train_x, train_y = probe_rows(data)
    logging.info('linear probe: %d training rows (%s)', len(train_x), data.feature_note)
    probe = fit_linear_probe(train_x, train_y, data.features['val'], labels['val'])
    predicted = probe.predict(data.features['test'])
    score(
      'linear_probe',
      [out.consensus[c] for c in predicted],
      val_class_accuracy=probe.val_accuracy,
      test_class_accuracy=accuracy(predicted, labels['test']),
      l2=probe.l2,
      features=data.feature_note,
    )
  else:
    for name in ('class_oracle', 'linear_probe'):
      out.skipped[name] = no_classes
      logging.info('baseline %s skipped: %s', name, no_classes)
  neighbours = nearest_neighbour_captions(
    scorer,
    data.features['train'],
    refs['train'],
    data.features['test'],
    k,
    train_labels=None if predicted is None else data.labels['train'],
    test_classes=predicted,
  )
  score('nearest_neighbour', neighbours, features=data.feature_note)
  if min(len(r) for r in refs['test']) < 2:
    out.skipped['human'] = 'a test image has fewer than 2 references'
    logging.info('baseline human skipped: %s', out.skipped['human'])
  else:
    out.scores['human'] = human_scores(refs['test'], train_captions, meteor)
  return out
