"""Caption metrics on host: BLEU (nltk, no nltk data needed) and the coco-caption set (pycocoevalcap)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
import math
import shutil
import warnings

from absl import logging
import numpy as np
from pycocoevalcap.cider import cider as cider_scorer
from pycocoevalcap.meteor import meteor as meteor_lib
from pycocoevalcap.rouge import rouge as rouge_scorer

_BLEU_WEIGHTS = {
  'bleu1': (1.0, 0.0, 0.0, 0.0),
  'bleu2': (0.5, 0.5, 0.0, 0.0),
  'bleu3': (1 / 3, 1 / 3, 1 / 3),
  'bleu4': (0.25, 0.25, 0.25, 0.25),
}

# What captioning computes on val after every epoch (METEOR only at test): the candidates for
# config.selection_metric.
VALIDATION_METRICS = ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'bleu4_sentence_mean', 'rouge_l', 'cider')

References = Sequence[Sequence[Sequence[str]]]  # per image: its reference captions, each a token list
Hypotheses = Sequence[Sequence[str]]  # per image: one generated token list


def _lower(references: References, hypotheses: Hypotheses) -> tuple[list, list]:
  if len(references) != len(hypotheses):
    raise ValueError(f'{len(references)} reference sets but {len(hypotheses)} hypotheses')
  if not hypotheses:
    raise ValueError('BLEU of an empty corpus (no images) is undefined')
  for i, refs in enumerate(references):
    if not refs:
      raise ValueError(f'image {i} has no reference captions')
  refs = [[[w.lower() for w in ref] for ref in image_refs] for image_refs in references]
  hyps = [[w.lower() for w in hyp] for hyp in hypotheses]
  return refs, hyps


def _bleu_score():
  """nltk's bleu_score, imported at the first BLEU: nltk pulls in scipy.stats (seconds at every launch.py start)."""
  from nltk.translate import bleu_score

  return bleu_score


def _matched_ngrams(refs: list, hyps: list, max_n: int) -> list[int]:
  """Clipped n-gram matches over the corpus for n = 1..max_n: the numerators of nltk's modified precisions."""
  bleu = _bleu_score()
  return [sum(bleu.modified_precision(r, h, n).numerator for r, h in zip(refs, hyps)) for n in range(1, max_n + 1)]


def _bleu_or_zero(refs: list, hyps: list, weights: Sequence[Sequence[float]]) -> list[float]:
  """nltk corpus_bleu per weight vector, but exactly 0.0 where a weighted n-gram order has no match.

  Without smoothing nltk replaces a zero precision by the smallest float (so BLEU-4 of a corpus without
  a single 4-gram match comes out as about 1e-77, or 1e-231 with three orders unmatched); a reader of
  results.json must see the 0 that the log prints.
  """
  matched = _matched_ngrams(refs, hyps, max(len(w) for w in weights))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # nltk warns about each zero count it replaces
    scores = _bleu_score().corpus_bleu(refs, hyps, weights=[tuple(w) for w in weights])
  scores = scores if len(weights) > 1 else [scores]
  return [
    float(score) if all(m > 0 for m, w in zip(matched, ws) if w > 0) else 0.0 for score, ws in zip(scores, weights)
  ]


def corpus_bleu_scores(references: References, hypotheses: Hypotheses) -> dict[str, float]:
  """Corpus BLEU-1..4 (nltk corpus_bleu, no smoothing) against all references of each image.

  Tokens are lower-cased. An empty hypothesis does not crash: it adds no
  matches, 1 to each n-gram order's denominator (nltk's max(1, count)) and its
  shortest reference's length to the brevity penalty's reference length. A
  BLEU-n whose orders 1..n include one without any match in the corpus is
  exactly 0.0 (nltk would return its smoothing floor, a number below 1e-75).

  Args:
    references: per image, its reference captions as token lists.
    hypotheses: per image, one generated caption as a token list.

  Returns:
    {'bleu1': ..., 'bleu2': ..., 'bleu3': ..., 'bleu4': ...}, each in [0, 1].
  """
  refs, hyps = _lower(references, hypotheses)
  return dict(zip(_BLEU_WEIGHTS, _bleu_or_zero(refs, hyps, list(_BLEU_WEIGHTS.values()))))


def sentence_bleu_scores(references: References, hypotheses: Hypotheses) -> list[float]:
  """Per image, nltk sentence_bleu (default BLEU-4 weights, no smoothing): the homework's metric.

  Without smoothing, an image whose hypothesis shares no n-gram of some order
  1..4 with its references (e.g. any hypothesis shorter than 4 words) scores
  0.0 (nltk returns its smoothing floor, below 1e-75, and warns; both are
  replaced here).

  Args:
    references: per image, its reference captions as token lists.
    hypotheses: per image, one generated caption as a token list.

  Returns:
    One score in [0, 1] per image.
  """
  refs, hyps = _lower(references, hypotheses)
  scores = [_bleu_or_zero([r], [h], [_BLEU_WEIGHTS['bleu4']])[0] for r, h in zip(refs, hyps)]
  return [float(s) for s in scores]


def sentence_bleu_mean(references: References, hypotheses: Hypotheses) -> float:
  """Mean over images of sentence_bleu_scores."""
  scores = sentence_bleu_scores(references, hypotheses)
  return float(sum(scores) / len(scores))


def _ngram_counts(tokens: Sequence[str], n: int) -> collections.Counter:
  """Counts of every 1..n-gram (as tuples) of one token list."""
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i : i + k])] += 1
  return counts


class CiderD:
  """CIDEr-D (Vedantam et al. 2015, as coco-caption computes it) with document frequencies fixed up front.

  coco-caption takes the document frequencies from the references of the corpus being scored; for
  self-critical training they come from the training references instead (fixed, so the reward of a
  caption does not depend on which other images share its batch). With `document_references` equal
  to the scored corpus' references the scores equal pycocoevalcap's `Cider` (tested).
  """

  def __init__(self, document_references: References, n: int = 4, sigma: float = 6.0):
    self.n, self.sigma = n, sigma
    self.document_frequency = collections.Counter()
    for image_refs in document_references:
      self.document_frequency.update(set().union(*(_ngram_counts([w.lower() for w in r], n) for r in image_refs)))
    self.log_num_documents = math.log(float(len(document_references)))

  def _vector(self, tokens: Sequence[str]) -> tuple[list[dict], np.ndarray, int]:
    """Per n-gram order: tf-idf weights, their norm; and the caption's length (coco counts its bigrams)."""
    vec = [{} for _ in range(self.n)]
    norm = np.zeros(self.n)
    for ngram, tf in _ngram_counts(tokens, self.n).items():
      weight = tf * (self.log_num_documents - math.log(max(1.0, self.document_frequency[ngram])))
      vec[len(ngram) - 1][ngram] = weight
      norm[len(ngram) - 1] += weight**2
    return vec, np.sqrt(norm), max(len(tokens) - 1, 0)

  def image_score(self, image_refs: Sequence[Sequence[str]], hypothesis: Sequence[str]) -> float:
    """CIDEr-D of one caption against its image's references (x10, mean over orders and references)."""
    vec_h, norm_h, len_h = self._vector([w.lower() for w in hypothesis])
    total = np.zeros(self.n)
    for ref in image_refs:
      vec_r, norm_r, len_r = self._vector([w.lower() for w in ref])
      penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma**2))
      for k in range(self.n):
        # Clipped: a hypothesis n-gram counts at most as much as the reference holds it (the "-D").
        dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
        if norm_h[k] and norm_r[k]:
          dot /= norm_h[k] * norm_r[k]
        total[k] += dot * penalty
    return float(10.0 * total.mean() / len(image_refs))

  def pairwise_scores(self, captions: Sequence[Sequence[str]]) -> np.ndarray:
    """M x M: entry [h, r] is image_score([captions[r]], captions[h]), the CIDEr-D of h against r alone.

    The mean of a row over a set of columns is h's CIDEr-D against those captions as its references
    (CIDEr-D averages over references). Computed through each n-gram's list of the captions holding it,
    so M in the hundreds takes well under a second.
    """
    vectors = [self._vector([w.lower() for w in c]) for c in captions]
    m = len(captions)
    dots = np.zeros((self.n, m, m))
    for k in range(self.n):
      postings = collections.defaultdict(list)
      for i, (vec, _, _) in enumerate(vectors):
        for ngram, weight in vec[k].items():
          postings[ngram].append((i, weight))
      for items in postings.values():
        rows = np.array([i for i, _ in items])
        weights = np.array([w for _, w in items])
        # Clipped as in image_score: min(w_h, w_r) * w_r for every (h, r) pair that holds the n-gram.
        dots[k][np.ix_(rows, rows)] += np.minimum.outer(weights, weights) * weights[None, :]
    norms = np.stack([v[1] for v in vectors], axis=1)  # n x M
    denominators = norms[:, :, None] * norms[:, None, :]
    dots = np.where(denominators > 0, dots / np.where(denominators > 0, denominators, 1.0), dots)
    lengths = np.array([v[2] for v in vectors], np.float64)
    penalty = np.exp(-((lengths[:, None] - lengths[None, :]) ** 2) / (2 * self.sigma**2))
    return 10.0 * dots.mean(axis=0) * penalty

  def scores(self, references: References, hypotheses: Hypotheses) -> np.ndarray:
    """Per-image CIDEr-D."""
    refs, hyps = _lower(references, hypotheses)
    return np.array([self.image_score(r, h) for r, h in zip(refs, hyps)])


def java_available() -> bool:
  """METEOR runs a Java jar; pycocoevalcap fails with a misleading AttributeError when `java` is missing."""
  return shutil.which('java') is not None


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
  """Corpus and per-image METEOR 1.5 through pycocoevalcap's Java process, ended here (not left to the GC)."""
  scorer = meteor_lib.Meteor()
  try:
    corpus, per_image = scorer.compute_score(gts, res)
    return float(corpus), [float(s) for s in per_image]
  finally:
    scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()


def coco_scores(
  references: References, hypotheses: Hypotheses, *, meteor: bool = False, per_image: bool = False
) -> dict:
  """The coco-caption metrics on the project's own tokens (lower-cased words; no PTB tokenizer).

  BLEU-1..4 are the project's (nltk corpus BLEU, equal to pycocoevalcap's Bleu on the same tokens to
  about 1e-6, tested); ROUGE-L, CIDEr-D and METEOR come from pycocoevalcap. METEOR (a Java process,
  about 20 s on 210 images) only when `meteor` is set; without Java it is skipped with one warning.

  Args:
    references: per image, its reference captions as token lists.
    hypotheses: per image, one generated caption as a token list.
    meteor: also compute METEOR.
    per_image: also return 'per_image': {'cider': [...], 'rouge_l': [...][, 'meteor': [...]]} (for paired
      bootstrap tests).

  Returns:
    {'bleu1'..'bleu4', 'rouge_l', 'cider'[, 'meteor'][, 'per_image']}.
  """
  refs, hyps = _lower(references, hypotheses)
  scores = corpus_bleu_scores(refs, hyps)
  gts = {i: [' '.join(r) for r in image_refs] for i, image_refs in enumerate(refs)}
  res = {i: [' '.join(h)] for i, h in enumerate(hyps)}
  rouge, rouge_per_image = rouge_scorer.Rouge().compute_score(gts, res)
  cider, cider_per_image = cider_scorer.Cider().compute_score(gts, res)
  scores['rouge_l'], scores['cider'] = float(rouge), float(cider)
  meteor_per_image = None
  if meteor:
    if java_available():
      scores['meteor'], meteor_per_image = _meteor(gts, res)
    else:
      logging.warning('METEOR skipped: no `java` on PATH (install a JRE, e.g. openjdk-17-jre-headless)')
  if per_image:
    scores['per_image'] = {'cider': [float(s) for s in cider_per_image], 'rouge_l': [float(s) for s in rouge_per_image]}
    if meteor_per_image is not None:
      scores['per_image']['meteor'] = meteor_per_image
  return scores


def caption_scores(
  references: References, hypotheses: Hypotheses, *, meteor: bool = False, per_image: bool = False
) -> dict:
  """What the project reports for a split's captions: coco_scores plus the mean sentence BLEU-4.

  Args:
    references: per image, its reference captions as token lists.
    hypotheses: per image, one generated caption as a token list.
    meteor: also compute METEOR (Java).
    per_image: also return coco_scores' 'per_image' scores.

  Returns:
    {'bleu1'..'bleu4', 'rouge_l', 'cider'[, 'meteor'], 'bleu4_sentence_mean'[, 'per_image']}.
  """
  scores = coco_scores(references, hypotheses, meteor=meteor, per_image=per_image)
  sentence_bleu4 = sentence_bleu_scores(references, hypotheses)
  scores['bleu4_sentence_mean'] = float(sum(sentence_bleu4) / len(sentence_bleu4))
  if per_image:
    scores['per_image']['bleu4'] = sentence_bleu4
  return scores


def paired_bootstrap_ci(
  scores_a: Sequence[float],
  scores_b: Sequence[float],
  *,
  num_resamples: int = 10000,
  confidence: float = 0.95,
  seed: int = 0,
) -> dict[str, float]:
  """Percentile bootstrap CI of mean(a - b) over images resampled with replacement (the same images for both).

  Args:
    scores_a: per-image scores of system A (e.g. CIDEr-D of the attention captioner).
    scores_b: per-image scores of system B on the same images in the same order.
    num_resamples: bootstrap resamples.
    confidence: coverage of the interval.
    seed: numpy seed of the resampling.

  Returns:
    {'mean_diff', 'low', 'high', 'p_a_not_better'}: the observed mean difference, the interval, and the
    fraction of resamples whose mean difference is <= 0.
  """
  a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f'paired scores need two equal-length 1-D sequences, got shapes {a.shape} and {b.shape}')
  diff = a - b
  idx = np.random.default_rng(seed).integers(0, len(diff), size=(num_resamples, len(diff)))
  means = diff[idx].mean(axis=1)
  tail = (1 - confidence) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return {
    'mean_diff': float(diff.mean()),
    'low': float(low),
    'high': float(high),
    'p_a_not_better': float(np.mean(means <= 0)),
  }
