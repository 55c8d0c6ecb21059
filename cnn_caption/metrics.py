"""BLEU for captioning, on host with nltk (no nltk data needed)."""

from __future__ import annotations

from typing import Sequence
import warnings

from nltk.translate import bleu_score

_BLEU_WEIGHTS = {
    'bleu1': (1.0, 0.0, 0.0, 0.0),
    'bleu2': (0.5, 0.5, 0.0, 0.0),
    'bleu3': (1 / 3, 1 / 3, 1 / 3),
    'bleu4': (0.25, 0.25, 0.25, 0.25),
}

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


def corpus_bleu_scores(references: References, hypotheses: Hypotheses) -> dict[str, float]:
  """Corpus BLEU-1..4 (nltk corpus_bleu, no smoothing) against all references of each image.

  Tokens are lower-cased. An empty hypothesis does not crash: it adds no
  matches, 1 to each n-gram order's denominator (nltk's max(1, count)) and its
  shortest reference's length to the brevity penalty's reference length; a
  corpus of only empty hypotheses scores 0.

  Args:
    references: per image, its reference captions as token lists.
    hypotheses: per image, one generated caption as a token list.

  Returns:
    {'bleu1': ..., 'bleu2': ..., 'bleu3': ..., 'bleu4': ...}, each in [0, 1].
  """
  refs, hyps = _lower(references, hypotheses)
  with warnings.catch_warnings():
    # A zero count of some n-gram order makes that BLEU (practically) 0; nltk also warns.
    warnings.simplefilter('ignore', UserWarning)
    scores = bleu_score.corpus_bleu(refs, hyps, weights=list(_BLEU_WEIGHTS.values()))
  return {name: float(s) for name, s in zip(_BLEU_WEIGHTS, scores)}


def sentence_bleu_mean(references: References, hypotheses: Hypotheses) -> float:
  """Mean over images of nltk sentence_bleu (default BLEU-4 weights, no smoothing): the homework's metric.

  Without smoothing, an image whose hypothesis shares no n-gram of some order
  1..4 with its references (e.g. any hypothesis shorter than 4 words) scores
  practically 0: nltk replaces the zero precision by the smallest float and
  warns; the warning is silenced here, the value (below 1e-75) is kept.

  Args:
    references: per image, its reference captions as token lists.
    hypotheses: per image, one generated caption as a token list.

  Returns:
    The mean score in [0, 1].
  """
  refs, hyps = _lower(references, hypotheses)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)
    scores = [bleu_score.sentence_bleu(r, h) for r, h in zip(refs, hyps)]
  return float(sum(scores) / len(scores))
