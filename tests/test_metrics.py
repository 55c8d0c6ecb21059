"""Caption metrics: BLEU, ROUGE-L and CIDEr-D against hand-worked values and pycocoevalcap; METEOR."""

import json
import math
from unittest import mock
import warnings

import numpy as np
import pytest

from cnn_caption.captioning import metrics
from cnn_caption.errors import UserError
from conftest import run_module

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
# image 2 has no 3-gram match, so its BLEU-4 is 0 (nltk without smoothing would give about 1e-154).
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
    # A 3-word hypothesis with every word right still has no 4-gram: sentence BLEU is 0.
    assert metrics.sentence_bleu_mean([[['a', 'b', 'c']]], [['a', 'b', 'c']]) == 0.0


def test_bleu_of_an_unmatched_order_is_exactly_zero():
  # Every word right, but no bigram of the references: nltk without smoothing returns its floor
  # (the smallest float to the power 3/4 for BLEU-4, about 1e-231); the score is 0.0 instead.
  refs = [[['red', 'circle', 'on', 'left']], [['blue', 'square', 'at', 'top']]]
  hyps = [['left', 'on', 'circle', 'red'], ['top', 'at', 'square', 'blue']]
  scores = metrics.corpus_bleu_scores(refs, hyps)
  assert scores['bleu1'] == 1.0
  assert scores['bleu2'] == scores['bleu3'] == scores['bleu4'] == 0.0
  assert metrics.sentence_bleu_mean(refs, hyps) == 0.0
  # Only BLEU-4 unmatched: the lower orders keep their values.
  scores = metrics.corpus_bleu_scores([[['a', 'red', 'circle', 'on', 'the', 'left']]], [['a', 'red', 'circle']])
  assert scores['bleu3'] == pytest.approx(math.exp(1 - 6 / 3)) and scores['bleu4'] == 0.0


def test_mismatched_or_empty_inputs():
  with pytest.raises(ValueError, match='2 reference sets but 1 hypotheses'):
    metrics.corpus_bleu_scores(REFS, HYPS[:1])
  with pytest.raises(ValueError, match='empty corpus'):
    metrics.sentence_bleu_mean([], [])
  with pytest.raises(ValueError, match='image 1 has no reference'):
    metrics.corpus_bleu_scores([REFS[0], []], HYPS)


# CIDEr-D by hand on a two-image corpus, one reference each: image A "a b", image B "c d".
# Document frequencies (images whose references hold the n-gram): every n-gram is in one image, so its
# idf is log(2) - log(1) = log 2 =: l; an n-gram in no reference also gets df max(1, 0) = 1, weight l.
# Hypothesis A "a b b" (tf-idf vectors per order, reference in brackets):
#   1-grams {a: l, b: 2l} [{a: l, b: l}]: clipped dot min(l,l)l + min(2l,l)l = 2l^2;
#     norms sqrt(5) l, sqrt(2) l -> 2 / sqrt(10)
#   2-grams {ab: l, bb: l} [{ab: l}]: l^2 / (sqrt(2) l * l) -> 1 / sqrt(2)
#   3-grams {abb} [none]: reference norm 0 -> 0;  4-grams: none -> 0
#   length penalty: coco counts bigrams, 2 vs 1, delta 1: exp(-1 / (2 * 6^2))
#   score: 10 * mean over the 4 orders / 1 reference
# Hypothesis B "c e": 1-grams {c: l, e: l} [{c: l, d: l}]: l^2 / (2 l^2) = 1/2; 2-grams {ce} vs {cd}: 0;
#   delta 0 -> 10 * (1/2) / 4 = 1.25
CIDER_REFS = [[['a', 'b']], [['c', 'd']]]
CIDER_HYPS = [['a', 'b', 'b'], ['c', 'e']]
CIDER_A = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
CIDER_B = 1.25


# ROUGE-L (coco: beta 1.2, the best precision and the best recall over references, taken separately).
# Image 1: "a red circle on the right" vs "a red circle on the left" (LCS 5: P 5/6, R 5/6) and
#   "there is a red circle" (LCS 3: P 3/6, R 3/5) -> P 5/6, R 5/6 -> F = 5/6.
# Image 2: "blue blue square" vs "a blue square at the top" (LCS 2: P 2/3, R 2/6) and
#   "there is a blue square" (LCS 2: P 2/3, R 2/5) -> P 2/3, R 2/5.
def _rouge_f(p, r, beta=1.2):
  return (1 + beta**2) * p * r / (r + beta**2 * p)


EXPECTED_ROUGE = (5 / 6 + _rouge_f(2 / 3, 2 / 5)) / 2


def test_cider_d_hand_worked():
  scorer = metrics.CiderD(CIDER_REFS)
  np.testing.assert_allclose(scorer.scores(CIDER_REFS, CIDER_HYPS), [CIDER_A, CIDER_B], rtol=1e-12)
  scores = metrics.coco_scores(CIDER_REFS, CIDER_HYPS, per_image=True)
  assert scores['cider'] == pytest.approx((CIDER_A + CIDER_B) / 2, rel=1e-12)
  np.testing.assert_allclose(scores['per_image']['cider'], [CIDER_A, CIDER_B], rtol=1e-12)


def test_cider_d_document_frequencies_come_from_the_given_corpus():
  # With "a" in both images' references its idf is 0: hypothesis "a" scores 0 against reference "a b";
  # with the scored corpus alone as documents (one image: log 1 = 0 for everything) every score is 0.
  scorer = metrics.CiderD([[['a', 'b']], [['a', 'c']]])
  assert scorer.image_score([['a', 'b']], ['a']) == 0.0
  assert scorer.image_score([['a', 'b']], ['b']) > 0.0
  assert metrics.CiderD([[['a', 'b']]]).image_score([['a', 'b']], ['a', 'b']) == 0.0


def test_rouge_l_hand_worked():
  assert metrics.coco_scores(REFS, HYPS)['rouge_l'] == pytest.approx(EXPECTED_ROUGE, rel=1e-12)


def test_project_bleu_and_cider_equal_pycocoevalcap():
  from pycocoevalcap.bleu import bleu as coco_bleu
  from pycocoevalcap.cider import cider as coco_cider

  # Hypotheses of >= 4 words: for a shorter one nltk counts max(1, 0) 4-grams in the denominator,
  # coco-caption 0, so their BLEU-4 differ (UCM captions are all longer).
  refs = REFS + [
    ['two green triangles in the center'.split(), 'green triangles'.split()],
    ['a small yellow circle'.split(), 'one yellow circle at the bottom'.split()],
  ]
  hyps = [
    HYPS[0],
    'blue blue square here'.split(),
    'two green triangles there'.split(),
    'a yellow circle at the bottom left'.split(),
  ]
  gts = {i: [' '.join(r) for r in rs] for i, rs in enumerate(refs)}
  res = {i: [' '.join(h)] for i, h in enumerate(hyps)}
  coco, _ = coco_bleu.Bleu(4).compute_score(gts, res, verbose=0)
  ours = metrics.coco_scores(refs, hyps)
  # pycocoevalcap adds 1e-9 / 1e-15 to its counts, hence not bit-equal.
  np.testing.assert_allclose([ours[f'bleu{n}'] for n in range(1, 5)], coco, rtol=1e-6)
  coco_cider_value, coco_per_image = coco_cider.Cider().compute_score(gts, res)
  assert ours['cider'] == pytest.approx(coco_cider_value, rel=1e-12)
  np.testing.assert_allclose(metrics.CiderD(refs).scores(refs, hyps), coco_per_image, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not metrics.java_available(), reason='METEOR needs java')
def test_meteor_orders_captions():
  # One call (the Java process takes most of the time): two images captioned by a reference, two unrelated.
  refs = REFS + REFS
  hyps = [r[0] for r in REFS] + [['nothing', 'alike'], ['at', 'all']]
  scores = metrics.coco_scores(refs, hyps, meteor=True, per_image=True)
  good, bad = scores['per_image']['meteor'][:2], scores['per_image']['meteor'][2:]
  assert min(good) > 0.9 and max(good) <= 1.0
  assert min(bad) >= 0.0 and max(bad) < 0.1
  assert min(good) > scores['meteor'] > max(bad)


def test_meteor_without_java_is_skipped_with_one_warning(monkeypatch):
  monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
  with mock.patch.object(metrics.logging, 'warning') as warning:
    scores = metrics.coco_scores(REFS, HYPS, meteor=True)
  assert 'meteor' not in scores and 'cider' in scores
  warning.assert_called_once()
  assert 'java' in warning.call_args[0][0]


def test_paired_bootstrap_ci():
  rng = np.random.default_rng(0)
  b = rng.normal(3.0, 1.0, size=200)
  # A constant per-image gain: every resample has exactly that mean difference.
  out = metrics.paired_bootstrap_ci(b + 0.25, b, num_resamples=500)
  assert out['mean_diff'] == out['low'] == pytest.approx(0.25) and out['high'] == pytest.approx(0.25)
  assert out['p_a_not_better'] == 0.0
  # Noise of sd 1 per image around a 0.1 gain: the 95% interval is about 0.1 +- 1.96 / sqrt(200) = +-0.14.
  out = metrics.paired_bootstrap_ci(b + 0.1 + rng.normal(0, 1, 200), b, num_resamples=4000)
  assert out['low'] < out['mean_diff'] < out['high']
  assert 0.2 < out['high'] - out['low'] < 0.36
  assert 0.0 < out['p_a_not_better'] < 0.5
  with pytest.raises(ValueError, match='equal-length'):
    metrics.paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_compare_two_workdirs_pairs_images_by_name(tmp_path):
  from cnn_caption.captioning import compare

  rng = np.random.default_rng(0)
  base = rng.uniform(0, 5, 60)
  for name, shift, order in (('a', 0.5, slice(None)), ('b', 0.0, slice(None, None, -1))):
    rows = [{'image_name': f'{i}.jpg', 'caption': ['x'], 'cider': base[i] + shift, 'rouge_l': 0.5} for i in range(60)]
    (tmp_path / name).mkdir()
    (tmp_path / name / 'test_captions.json').write_text(json.dumps(rows[order]))  # B lists them in reverse
  out = compare.compare(str(tmp_path / 'a'), str(tmp_path / 'b'), resamples=500)
  assert out['cider']['mean_diff'] == pytest.approx(0.5) and out['cider']['low'] == pytest.approx(0.5)
  assert out['rouge_l']['mean_diff'] == 0.0
  with pytest.raises(UserError, match='missing/test_captions.json: No such file'):
    compare.compare(str(tmp_path / 'a'), str(tmp_path / 'missing'))


@pytest.mark.slow
def test_compare_command_reports_and_bad_input_is_one_line(tmp_path):
  # The command (absl flags, positional workdirs): its report, then bad input in one line with exit code 2.
  rows = lambda shift: [{'image_name': f'{i}.jpg', 'cider': i + shift, 'rouge_l': 0.5} for i in range(20)]
  for name, shift in (('a', 0.5), ('b', 0.0)):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'test_captions.json').write_text(json.dumps(rows(shift)))
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  done = run_module('cnn_caption.captioning.compare', a, b, '--resamples=100')
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'A-B +0.5000' in done.stdout and '100 resamples' in done.stdout
  for args, culprit in (
    ((a, str(tmp_path / 'missing')), 'missing/test_captions.json'),
    ((a,), 'expected two workdirs'),
    ((a, b, '--resamples=0'), '--resamples=0'),
    ((a, b, '--resample=10'), "'resample'"),
  ):
    failed = run_module('cnn_caption.captioning.compare', *args)
    assert failed.returncode == 2 and failed.stdout == '', (args, failed.stdout, failed.stderr)
    assert failed.stderr.startswith('error: ') and failed.stderr.count('\n') == 1 and culprit in failed.stderr, args
