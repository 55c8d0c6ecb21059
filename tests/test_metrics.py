"""BLEU: identity, a hand-checked corpus, lower-casing and empty hypotheses."""

import math
import warnings

import pytest

from cnn_caption import metrics

# Two images with two references each.
REFS = [
    ['a red circle on the left'.split(), 'there is a red circle'.split()],
    ['a blue square at the top'.split(), 'there is a blue square'.split()],
]
HYPS = ['a red circle on the right'.split(), 'blue blue square'.split()]

# Worked by hand (nltk's definitions: clipped counts, closest reference length):
# Image 1, hyp "a red circle on the right" (6 words), closest reference length 6.
#   1-grams: a red circle on the | right          -> 5/6
#   2-grams: a-red red-circle circle-on on-the     -> 4/5 (the-right unmatched)
#   3-grams: a-red-circle red-circle-on circle-on-the -> 3/4
#   4-grams: a-red-circle-on red-circle-on-the     -> 2/3
# Image 2, hyp "blue blue square" (3 words); references have 6 and 5 words, closest is 5.
#   1-grams: blue (clipped to 1, each reference has one) + square -> 2/3
#   2-grams: blue-square (blue-blue unmatched)    -> 1/2
#   3-grams: blue-blue-square unmatched            -> 0/1
#   4-grams: none; nltk's denominator is max(1, 0) -> 0/1
# Corpus: p1 = 7/9, p2 = 5/7, p3 = 3/5, p4 = 2/4; hyp length 9 < reference length 6 + 5 = 11,
# so BP = exp(1 - 11/9).
_BP = math.exp(1 - 11 / 9)
EXPECTED_CORPUS = {
    'bleu1': _BP * 7 / 9,
    'bleu2': _BP * (7 / 9 * 5 / 7) ** (1 / 2),
    'bleu3': _BP * (7 / 9 * 5 / 7 * 3 / 5) ** (1 / 3),
    'bleu4': _BP * (7 / 9 * 5 / 7 * 3 / 5 * 2 / 4) ** (1 / 4),
}
# Per image, BLEU-4: image 1 has BP 1 and (5/6 * 4/5 * 3/4 * 2/3)^(1/4) = (1/3)^(1/4);
# image 2 has no 3-gram match, so nltk (no smoothing) gives practically 0 (about 1e-154).
EXPECTED_SENTENCE_MEAN = ((1 / 3) ** 0.25 + 0.0) / 2


def test_hand_checked_corpus():
  scores = metrics.corpus_bleu_scores(REFS, HYPS)
  assert scores.keys() == EXPECTED_CORPUS.keys()
  for key, expected in EXPECTED_CORPUS.items():
    assert scores[key] == pytest.approx(expected, rel=1e-12), key
  assert metrics.sentence_bleu_mean(REFS, HYPS) == pytest.approx(EXPECTED_SENTENCE_MEAN, rel=1e-12)


def test_corpus_against_itself_is_one():
  # Every sentence has >= 4 words: a shorter one has no 4-gram and would score below 1.
  refs = REFS + [['two green triangles in the center'.split()]]
  hyps = [image_refs[-1] for image_refs in refs]
  assert metrics.corpus_bleu_scores(refs, hyps) == {'bleu1': 1.0, 'bleu2': 1.0, 'bleu3': 1.0, 'bleu4': 1.0}
  assert metrics.sentence_bleu_mean(refs, hyps) == 1.0


def test_lower_cases_both_sides():
  upper_refs = [[[w.upper() for w in r] for r in image_refs] for image_refs in REFS]
  title_hyps = [[w.title() for w in h] for h in HYPS]
  assert metrics.corpus_bleu_scores(upper_refs, title_hyps) == metrics.corpus_bleu_scores(REFS, HYPS)
  assert metrics.sentence_bleu_mean(upper_refs, title_hyps) == metrics.sentence_bleu_mean(REFS, HYPS)


def test_empty_hypotheses_do_not_crash_and_warnings_are_silenced():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert set(metrics.corpus_bleu_scores(REFS, [[], []]).values()) == {0.0}
    assert metrics.sentence_bleu_mean(REFS, [[], []]) == 0.0
    # One empty hypothesis: 1-gram precision (5 + 0) / (6 + 1); reference length 6 + 5 (its shortest).
    scores = metrics.corpus_bleu_scores(REFS, [HYPS[0], []])
    assert scores['bleu1'] == pytest.approx(math.exp(1 - 11 / 6) * 5 / 7, rel=1e-12)
    assert metrics.sentence_bleu_mean(REFS, [HYPS[0], []]) == pytest.approx(EXPECTED_SENTENCE_MEAN, rel=1e-12)
    # A 3-word hypothesis with every word right still has no 4-gram: sentence BLEU is practically 0.
    assert metrics.sentence_bleu_mean([[['a', 'b', 'c']]], [['a', 'b', 'c']]) < 1e-75


def test_mismatched_or_empty_inputs():
  with pytest.raises(ValueError, match='2 reference sets but 1 hypotheses'):
    metrics.corpus_bleu_scores(REFS, HYPS[:1])
  with pytest.raises(ValueError, match='empty corpus'):
    metrics.sentence_bleu_mean([], [])
  with pytest.raises(ValueError, match='image 1 has no reference'):
    metrics.corpus_bleu_scores([REFS[0], []], HYPS)
