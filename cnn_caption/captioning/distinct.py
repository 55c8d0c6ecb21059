"""How distinct a captioner's output is: copying from the training captions, distinct captions, words used."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np

Captions = Sequence[Sequence[str]]  # one token list per image


def _key(caption: Sequence[str]) -> tuple[str, ...]:
  return tuple(w.lower() for w in caption)


def copied_fraction(hypotheses: Captions, training_captions: Iterable[Sequence[str]]) -> float:
  """Share of the hypotheses that equal some training caption word for word (lower-cased)."""
  if not hypotheses:
    raise ValueError('the copied fraction of no captions is undefined')
  seen = {_key(c) for c in training_captions}
  return sum(_key(h) in seen for h in hypotheses) / len(hypotheses)


def distinct_captions(hypotheses: Captions) -> int:
  """How many different captions (lower-cased token sequences) the hypotheses hold."""
  return len({_key(h) for h in hypotheses})


def vocab_used(hypotheses: Captions) -> int:
  """How many different words (lower-cased) the hypotheses use."""
  return len({w.lower() for h in hypotheses for w in h})


def distinctiveness(hypotheses: Captions, training_captions: Iterable[Sequence[str]]) -> dict[str, float | int]:
  """{'copied_fraction', 'distinct_captions', 'vocab_used'} of one split's generated captions."""
  return {
    'copied_fraction': copied_fraction(hypotheses, training_captions),
    'distinct_captions': distinct_captions(hypotheses),
    'vocab_used': vocab_used(hypotheses),
  }


def per_class_mean(values: Sequence[float], labels: Sequence[str]) -> dict[str, float]:
  """Mean of per-image values (e.g. CIDEr-D) over the images of each class, classes sorted by name."""
  if len(values) != len(labels):
    raise ValueError(f'{len(values)} values but {len(labels)} labels')
  values = np.asarray(values, np.float64)
  labels_array = np.asarray(labels, dtype=object)
  return {c: float(values[labels_array == c].mean()) for c in sorted(set(labels))}
