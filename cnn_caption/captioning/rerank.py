"""Consensus reranking of beam candidates: the final beam's caption that the nearest training images agree with.

For each image, beam search keeps beam_size candidate captions. The reranker finds the image's k most similar
training images (captioning.baselines.nearest_training_images: cosine similarity of mean-pooled features,
optionally among the training images of the image's predicted class) and scores every candidate by its
consensus, the mean CIDEr-D against the neighbours' reference captions taken one at a time (equal to CIDEr-D
against all of them as the references, which is what CiderD.image_score computes). The scorer's document
frequencies come from the training references, as for the nearest-neighbour baseline, so no val or test
caption informs a choice. With a weight w the score is consensus + w * log p / len (the candidate's summed
log-prob over its generated tokens, EOS counted). The highest score wins; among equals the earlier candidate,
so candidates ranked best first by the beam keep the beam's answer on ties. An extra candidate per image (the
consensus caption of its predicted class, say) can join the beam's; it wins only when strictly better.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnn_caption.captioning import baselines
from cnn_caption.captioning import metrics as metrics_lib

Caption = Sequence[str]


def consensus_scores(
  scorer: metrics_lib.CiderD, candidates: Sequence[Caption], references: Sequence[Caption]
) -> np.ndarray:
  """Per candidate, its mean CIDEr-D against each of the references as a single reference."""
  return np.array([scorer.image_score(references, c) for c in candidates], np.float64)


def rerank(
  scorer: metrics_lib.CiderD,
  candidates: Sequence[Sequence[Caption]],
  features: np.ndarray,
  train_features: np.ndarray,
  train_references: metrics_lib.References,
  k: int,
  *,
  train_labels: Sequence | None = None,
  classes: Sequence | None = None,
  logprobs: np.ndarray | None = None,
  lengths: np.ndarray | None = None,
  weight: float = 0.0,
  extra: Sequence[Caption | None] | None = None,
) -> list[int]:
  """Per image, the index of its chosen candidate.

  Args:
    scorer: CIDEr-D with the training references' document frequencies (metrics.CiderD(train refs)).
    candidates: per image, its candidate captions (word lists), best first by the beam's score.
    features: images x C, the mean-pooled features of the images being captioned.
    train_features: training images x C, the neighbour pool's features (the same kind as `features`).
    train_references: per training image, its reference captions.
    k: neighbours per image (> 0).
    train_labels: per training image, its class (with `classes`: only neighbours of the image's class).
    classes: per image, its class (e.g. predicted), or None for neighbours of any class.
    logprobs: images x K, each candidate's summed log-prob; a candidate whose log-prob is not finite (a beam
      slot no hypothesis filled) is never chosen unless every one is such.
    lengths: images x K, each candidate's length (generated tokens, EOS counted).
    weight: w of consensus + w * log p / len (needs logprobs and lengths when not 0).
    extra: per image, one more candidate (or None) scored by consensus alone (weight 0 only), e.g. the
      consensus caption of the image's predicted class; it wins only when strictly better.

  Returns:
    per image, an index into its candidates; len(its candidates) picks its extra candidate.
  """
  if k < 1:
    raise ValueError(f'rerank needs k >= 1 neighbours, got {k}')
  if weight and extra is not None:
    raise ValueError('extra candidates have no log-prob: rerank them with weight 0')
  if weight and (logprobs is None or lengths is None):
    raise ValueError("a rerank weight needs the candidates' logprobs and lengths")
  if len(candidates) != len(features):
    raise ValueError(f'{len(candidates)} candidate lists for {len(features)} feature rows')
  if extra is not None and len(extra) != len(candidates):
    raise ValueError(f'{len(extra)} extra candidates for {len(candidates)} images')
  neighbours = baselines.nearest_training_images(train_features, features, k, train_labels, classes)
  chosen = []
  for i, (image_candidates, image_neighbours) in enumerate(zip(candidates, neighbours)):
    references = [c for j in image_neighbours for c in train_references[j]]
    score = consensus_scores(scorer, image_candidates, references)
    if logprobs is not None:
      logp = np.asarray(logprobs[i], np.float64)[: len(image_candidates)]
      if weight:
        length = np.maximum(np.asarray(lengths[i], np.float64)[: len(image_candidates)], 1.0)
        score = score + weight * np.where(np.isfinite(logp), logp, 0.0) / length
      if np.isfinite(logp).any():
        score = np.where(np.isfinite(logp), score, -np.inf)
    best = int(np.argmax(score))
    if extra is not None and extra[i] is not None:
      if consensus_scores(scorer, [extra[i]], references)[0] > score[best]:
        best = len(image_candidates)
    chosen.append(best)
  return chosen
