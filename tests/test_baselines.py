"""Captioning baselines and distinctiveness figures on hand-made data, and --mode=baselines end to end."""

import json
import math
import os

import numpy as np
import pytest

from cnn_caption import cli
from cnn_caption.captioning import baselines
from cnn_caption.captioning import distinct
from cnn_caption.captioning import metrics
from cnn_caption.data import captions as captions_lib
from cnn_caption.errors import UserError
from configs import captioner as captioner_config
from configs import classifier as classifier_config
from conftest import run_launch


def words(*captions):
  return [c.split() for c in captions]


def test_pairwise_cider_matches_a_hand_computation():
  # Two documents, neither holding 'c': every n-gram's idf is log(2) (df of 'c' counts as 1).
  scorer = metrics.CiderD([[['a', 'b']], [['x', 'y']]])
  # 'a b' against itself: cosine 1 for unigrams and bigrams, nothing of orders 3 and 4: 10 * 2 / 4.
  # 'a b' against 'a c': unigram cosine log2^2 / (sqrt(2) log2)^2 = 1/2, no shared bigram: 10 * 0.5 / 4.
  np.testing.assert_allclose(scorer.pairwise_scores(words('a b', 'a c')), [[5.0, 1.25], [1.25, 5.0]])


def test_pairwise_cider_equals_single_reference_image_scores():
  rng = np.random.default_rng(0)
  vocab = ['a', 'red', 'roof', 'green', 'field', 'next', 'to', 'the', 'road']
  captions = [list(rng.choice(vocab, size=rng.integers(1, 9))) for _ in range(12)]
  scorer = metrics.CiderD([captions[:4], captions[4:8], captions[8:]])
  pairwise = scorer.pairwise_scores(captions)
  expected = [[scorer.image_score([r], h) for r in captions] for h in captions]
  np.testing.assert_allclose(pairwise, expected, rtol=1e-12, atol=1e-12)


TRAIN_REFS = [
  words('a red roof', 'a red roof', 'a red roof'),  # class 'houses'
  words('green field', 'a green field', 'a green field'),  # class 'houses'
  words('the blue sea', 'the blue sea', 'waves'),  # class 'beach'
  words('the sea', 'the sea', 'a beach'),  # class 'beach'
  words('a long road', 'a road', 'a road'),  # class 'roads'
  words('a road', 'cars on a road', 'a bridge'),  # class 'roads'
]
TRAIN_LABELS = ['houses', 'houses', 'beach', 'beach', 'roads', 'roads']


def test_consensus_is_the_caption_closest_on_average_to_the_other_instances():
  scorer = metrics.CiderD(TRAIN_REFS)
  consensus = baselines.class_consensus(scorer, TRAIN_REFS, TRAIN_LABELS)
  # houses: 'a red roof' has two identical other instances (7.5 each: cosine 1 at orders 1-3) against one
  # for 'a green field'. beach: 'the blue sea' (7.5 from its copy, about 2 from each 'the sea') beats 'the
  # sea' (5 from its copy: orders 1-2, plus about 2 from each 'the blue sea'). roads: 'a road' has a copy.
  assert consensus == {'beach': ['the', 'blue', 'sea'], 'houses': ['a', 'red', 'roof'], 'roads': ['a', 'road']}
  # The same choice as scoring each caption against all the other instances one by one.
  for label in consensus:
    captions = [c for refs, lab in zip(TRAIN_REFS, TRAIN_LABELS) if lab == label for c in refs]
    brute = [scorer.image_score(captions[:i] + captions[i + 1 :], c) for i, c in enumerate(captions)]
    assert captions[int(np.argmax(brute))] == consensus[label]


def test_consensus_of_equals_is_the_first():
  scorer = metrics.CiderD([words('red roof', 'blue car')])
  # Each of two captions against the other alone: the same score, so the first wins.
  assert baselines.consensus_index(scorer, words('red roof', 'blue car')) == 0
  assert baselines.consensus_index(scorer, words('blue car', 'red roof')) == 0
  assert baselines.consensus_index(scorer, words('red roof')) == 0


# Three separable classes in 2-D: 'houses' right, 'beach' left, 'roads' up.
CENTRES = {'houses': (2.0, 0.0), 'beach': (-2.0, 0.0), 'roads': (0.0, 3.0)}
OFFSETS = [(0.3, 0.2), (-0.2, 0.3), (0.1, -0.3), (-0.3, -0.1)]


def points(labels, offsets):
  return np.array([np.add(CENTRES[c], o) for c, o in zip(labels, offsets)], np.float32)


def test_linear_probe_separates_separable_classes_and_breaks_ties_with_the_larger_l2():
  train_labels = [c for c in CENTRES for _ in OFFSETS]
  train = points(train_labels, OFFSETS * 3)
  val_labels = ['roads', 'beach', 'houses']
  probe = baselines.fit_linear_probe(
    train, train_labels, points(val_labels, OFFSETS[:3]), val_labels, l2_grid=(1e-3, 1e-2), steps=100
  )
  assert probe.classes == ['beach', 'houses', 'roads']
  assert probe.val_accuracy == 1.0 and probe.l2 == 1e-2  # both strengths separate val: the larger is kept
  test = np.array([[3.0, 0.5], [-1.5, -0.5], [0.2, 2.5], [1.0, 0.0], [-1.0, 0.1]], np.float32)
  assert probe.predict(test) == ['houses', 'beach', 'roads', 'houses', 'beach']
  np.testing.assert_allclose(probe.mean, train.mean(axis=0), rtol=1e-6)


def test_nearest_neighbour_takes_the_consensus_of_the_nearest_images_within_the_class():
  scorer = metrics.CiderD(TRAIN_REFS)
  train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.1, -1.0]])
  test = np.array([[0.9, 0.12], [-2.0, 0.1]])  # by cosine: image 1, then 0, then 2; image 3
  pick = lambda k, **kw: baselines.nearest_neighbour_captions(scorer, train, TRAIN_REFS, test, k, **kw)
  assert pick(1) == words('a green field', 'the sea')
  # Within class 'beach' image 1 is no candidate; image 2 is the nearest beach image. Within 'roads' image 4.
  assert pick(1, train_labels=TRAIN_LABELS, test_classes=['beach', 'roads']) == words('the blue sea', 'a road')
  # k=2 within 'houses': images 1 and 0; 'a red roof' is three of the six candidates, 'a green field' two.
  assert pick(2, train_labels=TRAIN_LABELS, test_classes=['houses', 'roads']) == words('a red roof', 'a road')


def test_copied_fraction_distinct_captions_and_vocabulary():
  hyps = words('a red roof', 'A red roof', 'blue car', '') + [[]]
  train = [('a', 'red', 'roof'), ('sea',)]
  assert distinct.copied_fraction(hyps, train) == pytest.approx(2 / 5)
  assert distinct.distinct_captions(hyps) == 3  # 'a red roof', 'blue car', the empty caption
  assert distinct.vocab_used(hyps) == 5
  assert distinct.distinctiveness(hyps, iter(train)) == {
    'copied_fraction': pytest.approx(0.4),
    'distinct_captions': 3,
    'vocab_used': 5,
  }
  assert distinct.per_class_mean([1.0, 2.0, 6.0], ['x', 'y', 'x']) == {'x': 3.5, 'y': 2.0}


def test_human_agreement_of_identical_references_is_perfect():
  test_refs = [words('a b c d', 'a b c d'), words('e f g h', 'e f g h')]
  scores = baselines.human_scores(test_refs, [('a', 'b', 'c', 'd')], meteor=False)
  assert scores['test_bleu4'] == pytest.approx(1.0) and scores['test_rouge_l'] == pytest.approx(1.0)
  # Every n-gram in one of the 2 documents (idf log 2), cosine 1 at all 4 orders: CIDEr-D 10.
  assert scores['test_cider'] == pytest.approx(10.0) and scores['test_cider_df_all_references'] == pytest.approx(10.0)
  assert scores['test_copied_fraction'] == 0.5 and scores['test_distinct_captions'] == 2
  assert scores['test_vocab_used'] == 8


def toy_data(labels=True):
  val_labels, test_labels = ['roads', 'beach', 'houses'], ['houses', 'beach', 'roads', 'beach']
  test_refs = [words('a red roof', 'red roofs'), words('the sea', 'sea'), words('a road', 'the road'), words('sea')]
  return baselines.BaselineData(
    references={
      'train': TRAIN_REFS,
      'val': [words('a road'), words('the sea'), words('a roof')],
      'test': test_refs,
    },
    features={
      'train': points(TRAIN_LABELS, OFFSETS + OFFSETS[:2]),
      'val': points(val_labels, OFFSETS[1:]),
      'test': points(test_labels, OFFSETS),
    },
    labels={'train': TRAIN_LABELS, 'val': val_labels, 'test': test_labels} if labels else None,
  )


def test_run_baselines_on_toy_data():
  out = baselines.run_baselines(toy_data(), meteor=False, k=1)
  assert set(out.scores) == {'class_oracle', 'linear_probe', 'nearest_neighbour'}
  assert out.skipped == {'human': 'a test image has fewer than 2 references'}
  consensus = {'beach': ['the', 'blue', 'sea'], 'houses': ['a', 'red', 'roof'], 'roads': ['a', 'road']}
  assert out.consensus == consensus
  expected = [consensus[c] for c in ['houses', 'beach', 'roads', 'beach']]
  assert out.captions['class_oracle'] == out.captions['linear_probe'] == expected
  probe = out.scores['linear_probe']
  assert probe['val_class_accuracy'] == probe['test_class_accuracy'] == 1.0 and probe['l2'] in baselines.L2_GRID
  oracle = out.scores['class_oracle']
  assert oracle['test_copied_fraction'] == 1.0 and oracle['test_distinct_captions'] == 3
  assert oracle['test_vocab_used'] == 7  # a red roof the blue sea road
  for name in ('test_bleu1', 'test_bleu2', 'test_bleu3', 'test_bleu4', 'test_rouge_l', 'test_cider'):
    assert all(math.isfinite(s[name]) for s in out.scores.values()), name
  assert 'test_meteor' not in oracle
  # k=1 within the predicted class: the nearest image of that class, by cosine, gives its own consensus.
  assert out.captions['nearest_neighbour'] == words('a red roof', 'the sea', 'a road', 'the sea')


def test_run_baselines_without_classes_skips_the_class_baselines():
  data = toy_data(labels=False)
  data.references['test'][3] = words('sea', 'the sea')
  out = baselines.run_baselines(data, meteor=False, k=1)
  assert set(out.scores) == {'nearest_neighbour', 'human'}
  assert set(out.skipped) == {'class_oracle', 'linear_probe'}
  assert 'no classes' in out.skipped['class_oracle'] and out.consensus == {}


def test_karpathy_class_becomes_the_label(tmp_path):
  (tmp_path / 'x.png').write_bytes(b'')
  item = {'filename': 'x.png', 'split': 'train', 'sentences': [{'tokens': ['a']}], 'class': 'beach'}
  (tmp_path / 'dataset.json').write_text(json.dumps({'images': [item]}))
  assert captions_lib.load_karpathy(str(tmp_path))['train'][0].label == 'beach'
  item['class'] = 3
  (tmp_path / 'dataset.json').write_text(json.dumps({'images': [item]}))
  with pytest.raises(UserError, match='"class" is not a non-empty string'):
    captions_lib.load_karpathy(str(tmp_path))


def test_baselines_mode_needs_a_captioning_config(tmp_path):
  with pytest.raises(UserError, match=r"needs a captioning config, not one with config.task='classification'"):
    cli.run('baselines', classifier_config.get_config(), str(tmp_path / 'w'), [])
  with pytest.raises(UserError, match='--workdir is required'):
    cli.run('baselines', captioner_config.get_config('smoke'), None, [])
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.slow
def test_baselines_mode_on_the_smoke_config(tmp_path):
  workdir = tmp_path / 'w'
  proc = run_launch(
    '--mode=baselines',
    '--config=configs/captioner.py:smoke',
    '--config.data.synthetic_num_images=30',
    f'--workdir={workdir}',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert [line.split(':')[0] for line in lines] == [*baselines.NAMES, 'written']
  assert lines[0].startswith('class_oracle: test_cider=')
  saved = json.loads((workdir / 'baselines.json').read_text())
  assert set(saved) == set(baselines.NAMES)
  metric_names = {f'test_{m}' for m in ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l', 'cider', 'copied_fraction')}
  for name, scores in saved.items():
    assert metric_names <= set(scores) and all(isinstance(v, (int, float)) for v in scores.values()), name
  assert {'val_class_accuracy', 'test_class_accuracy', 'l2'} <= set(saved['linear_probe'])
  assert saved['class_oracle']['test_copied_fraction'] == 1.0
  shown = {n: s['test_cider'] for n, s in saved.items()}
  for line in lines[:4]:
    name, rest = line.split(': ', 1)
    assert f'test_cider={shown[name]:.4g}' in rest
  captions = json.loads((workdir / 'baselines_captions.json').read_text())
  assert set(captions['consensus_by_class']) == {'plain', 'striped', 'checkered'}
  assert len(captions['test']) == 3
  assert all(row['class_oracle'] == captions['consensus_by_class'][row['class']] for row in captions['test'])
