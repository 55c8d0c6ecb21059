"""Captioning baselines and distinctiveness figures on hand-made data, and --mode=baselines end to end."""

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np
import pytest

from cnn_caption import cli
from cnn_caption.captioning import baselines
from cnn_caption.captioning import compare
from cnn_caption.captioning import distinct
from cnn_caption.captioning import metrics
from cnn_caption.data import captions as captions_lib
from cnn_caption.errors import UserError
from cnn_caption.report import captioner as captioner_report
from cnn_caption.report import compare as compare_report
from cnn_caption.report import files as report_files
from cnn_caption.tasks import captioning
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


def dihedral_views(data):
  """8 x 6 x 2 train views: view v of image i is its feature shifted by (v, -v), so their mean is shifted by 3.5."""
  shifts = np.array([[v, -v] for v in range(8)], np.float32)
  return data.features['train'][None] + shifts[:, None]


def test_dihedral_views_reach_the_probe_as_rows_per_image_and_the_neighbours_as_their_mean(monkeypatch):
  seen = {}
  fit = baselines.fit_linear_probe
  nearest = baselines.nearest_neighbour_captions

  def spy_fit(train_features, train_labels, *args, **kwargs):
    seen['probe'] = (np.array(train_features), list(train_labels))
    return fit(train_features, train_labels, *args, **kwargs)

  def spy_nearest(scorer, train_features, *args, **kwargs):
    seen['neighbours'] = np.array(train_features)
    return nearest(scorer, train_features, *args, **kwargs)

  monkeypatch.setattr(baselines, 'fit_linear_probe', spy_fit)
  monkeypatch.setattr(baselines, 'nearest_neighbour_captions', spy_nearest)
  # Without views (the default): the probe and the neighbours read features['train'] as they are.
  plain = toy_data()
  out = baselines.run_baselines(plain, meteor=False, k=1)
  np.testing.assert_array_equal(seen['probe'][0], plain.features['train'])
  assert seen['probe'][1] == TRAIN_LABELS
  np.testing.assert_array_equal(seen['neighbours'], plain.features['train'])
  assert out.scores['linear_probe']['features'] == out.scores['nearest_neighbour']['features'] == plain.feature_note
  assert 'features' not in out.scores['class_oracle']
  # With 8 views: 48 probe rows, view-major (row v * 6 + i is image i under view v), labels repeated 8 times.
  views = dihedral_views(plain)
  data = baselines.BaselineData(
    references=plain.references,
    features={**plain.features, 'train': views.mean(axis=0)},
    labels=plain.labels,
    train_views=views,
    feature_note='8 views',
  )
  out = baselines.run_baselines(data, meteor=False, k=1)
  rows, labels = seen['probe']
  assert rows.shape == (48, 2) and labels == TRAIN_LABELS * 8
  np.testing.assert_allclose(rows[5 * 6 + 2], plain.features['train'][2] + [5.0, -5.0], rtol=1e-6)
  np.testing.assert_array_equal(rows.reshape(8, 6, 2), views)
  np.testing.assert_allclose(seen['neighbours'], plain.features['train'] + [3.5, -3.5], atol=1e-6)  # a row per image
  assert out.scores['linear_probe']['features'] == '8 views'
  with pytest.raises(ValueError, match='expected views x 6 training images'):
    baselines.probe_rows(dataclasses.replace(data, train_views=views[:, :5]))


class StubTask(captioning.CaptioningTask):
  """A CaptioningTask holding region features of hand-made images and nothing else (no data set, no encoder)."""

  def __init__(self, dihedral_train: bool, dihedral_test: bool):
    self.config = ml_collections.ConfigDict(
      {'data': {'dihedral_train': dihedral_train, 'dihedral_test': dihedral_test}}
    )
    regions = lambda n, scale: np.arange(n * 4 * 2, dtype=np.float32).reshape(n, 4, 2) * scale
    self.entries = {
      s: [captions_lib.ImageEntry(f'{s}{i}.png', '', s, (('a', 'b'),), 'c') for i in range(n)]
      for s, n in (('train', 3), ('val', 2), ('test', 2))
    }
    # What CaptioningTask.__init__ leaves: transform 0 for train, the decoded features (there: the mean of the
    # 8 transforms with dihedral_test) for val and test, and each transform's train features with dihedral_train.
    self.feats = {'train': regions(3, 1.0), 'val': regions(2, 10.0), 'test': regions(2, 100.0)}
    self.train_views = [regions(3, 1.0) + t for t in range(8)] if dihedral_train else []


def test_baseline_data_reads_the_features_the_captioner_reads():
  # Image i's regions hold 8i..8i+7 (x scale), so their mean over the 4 regions is (8i + 3, 8i + 4) x scale.
  plain = StubTask(dihedral_train=False, dihedral_test=False).baseline_data()
  np.testing.assert_array_equal(plain.features['train'], [[3, 4], [11, 12], [19, 20]])
  np.testing.assert_array_equal(plain.features['test'], [[300, 400], [1100, 1200]])
  assert plain.train_views is None and plain.feature_note == 'encoder features, mean over regions'
  scene = StubTask(dihedral_train=True, dihedral_test=True).baseline_data()
  # View t adds t to every region: 8 rows per image for the probe, their mean (+3.5) for the neighbours.
  assert scene.train_views.shape == (8, 3, 2)
  np.testing.assert_array_equal(scene.train_views[5], [[8, 9], [16, 17], [24, 25]])
  np.testing.assert_array_equal(scene.features['train'], [[6.5, 7.5], [14.5, 15.5], [22.5, 23.5]])
  np.testing.assert_array_equal(scene.features['test'], plain.features['test'])  # the task's decoded features
  assert baselines.probe_rows(scene)[0].shape == (24, 2)
  assert '8 dihedral views per image' in scene.feature_note and 'val/test: mean of the 8' in scene.feature_note


def test_each_baseline_is_a_workdir_that_compare_reads(tmp_path):
  data = toy_data()
  out = baselines.run_baselines(data, meteor=False, k=1)
  test_refs = data.references['test']
  entries = [
    captions_lib.ImageEntry(f'img{i}.png', '', 'test', tuple(map(tuple, refs)), label)
    for i, (refs, label) in enumerate(zip(test_refs, data.labels['test']))
  ]
  config = {'task': 'captioning', 'data': {'dir': str(tmp_path / 'no_data')}}
  folders = captioning.write_baseline_workdirs(str(tmp_path / 'w'), config, entries, test_refs, out)
  names = ['class_oracle', 'linear_probe', 'nearest_neighbour']
  assert folders == [str(tmp_path / 'w' / 'baselines' / n) for n in names]  # human: no caption per image
  probe_dir = tmp_path / 'w' / 'baselines' / 'linear_probe'
  assert sorted(os.listdir(probe_dir)) == ['config.json', 'results.json', 'test_captions.json']
  rows = json.loads((probe_dir / 'test_captions.json').read_text())
  # The rows a captioning run writes: its per-image scores are metrics.caption_scores' per-image scores.
  per_image = metrics.caption_scores(test_refs, out.captions['linear_probe'], per_image=True)['per_image']
  assert rows == captioning.caption_rows(entries, test_refs, out.captions['linear_probe'], per_image)
  assert rows[0]['image_name'] == 'img0.png' and rows[0]['caption'] == ['a', 'red', 'roof']
  assert rows[0]['class'] == 'houses' and rows[0]['references'] == ['a red roof', 'red roofs']
  results = json.loads((probe_dir / 'results.json').read_text())
  assert results['baseline'] == 'linear_probe' and results['test_cider'] == out.scores['linear_probe']['test_cider']
  assert results['test_cider'] == pytest.approx(np.mean(per_image['cider']))  # CIDEr-D is the per-image mean
  assert set(results['test_cider_per_class']) == {'houses', 'beach', 'roads'}
  assert json.loads((probe_dir / 'config.json').read_text()) == config
  # A run on the same test images: CIDEr-D 1 and ROUGE-L 0.5 on every image.
  run = tmp_path / 'run'
  run.mkdir()
  run_rows = [{**r, 'caption': ['x'], 'cider': 1.0, 'bleu4': 0.0, 'rouge_l': 0.5} for r in rows]
  (run / 'test_captions.json').write_text(json.dumps(run_rows))
  (run / 'config.json').write_text(json.dumps(config))
  (run / 'results.json').write_text(json.dumps({'test_cider': 1.0}))
  paired = compare.compare(str(run), str(probe_dir), resamples=200)
  assert paired['cider']['mean_a'] == 1.0 and paired['cider']['mean_b'] == pytest.approx(np.mean(per_image['cider']))
  assert paired['rouge_l']['mean_b'] == pytest.approx(np.mean(per_image['rouge_l']))
  html = compare_report.comparison_page(str(run), str(probe_dir), resamples=200)
  assert 'a red roof' in html and 'Per-image means, A - B' in html


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
  assert [line.split(':')[0] for line in lines] == [*baselines.NAMES, 'written', 'workdirs']
  assert lines[0].startswith('class_oracle: test_cider=')
  note = 'encoder features, mean over regions'
  assert lines[1].endswith(f'(features: {note})')
  saved = json.loads((workdir / 'baselines.json').read_text())
  assert set(saved) == set(baselines.NAMES)
  metric_names = {f'test_{m}' for m in ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l', 'cider', 'copied_fraction')}
  for name, scores in saved.items():
    numbers = {k: v for k, v in scores.items() if k != 'features'}
    assert metric_names <= set(scores) and all(isinstance(v, (int, float)) for v in numbers.values()), name
  assert saved['linear_probe']['features'] == saved['nearest_neighbour']['features'] == note
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
  # Each baseline with captions is a workdir: the paired bootstrap and the compare page read it like a run's.
  folders = workdir / 'baselines'
  assert sorted(os.listdir(folders)) == ['class_oracle', 'linear_probe', 'nearest_neighbour']
  probe, neighbours = str(folders / 'linear_probe'), str(folders / 'nearest_neighbour')
  assert json.loads((folders / 'linear_probe' / 'results.json').read_text())['test_cider'] == shown['linear_probe']
  paired = compare.compare(probe, neighbours, resamples=100)
  assert paired['cider']['mean_a'] == pytest.approx(shown['linear_probe'])
  # The synthetic scenes are found from the folder's config.json: the page shows thumbnails.
  assert len(captioner_report.dataset_entries(report_files.load_run(probe))) == 30
  assert cli.run('compare', None, probe, [], compare_to=neighbours) == 0
  assert 'data:image/jpeg;base64,' in open(os.path.join(probe, 'compare_nearest_neighbour.html')).read()
