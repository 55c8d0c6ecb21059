"""Consensus reranking of beam candidates: hand-worked toy sets, and the captioning task's decoding with it."""

import json

import jax
import numpy as np
import pytest
from test_scene import make_class_dataset

from cnn_caption.captioning import baselines
from cnn_caption.captioning import metrics as metrics_lib
from cnn_caption.captioning import rerank
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError
from cnn_caption.tasks import captioning
from cnn_caption.training import parallel
from configs import captioner as captioner_config
from configs import captioner_scene as scene_config
from conftest import jit_init
from conftest import override

# Four training images: two near (1, 0) about a red circle, two near (0, 1) about a blue square.
TRAIN_FEATURES = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
RED = [['a', 'red', 'circle'], ['a', 'small', 'red', 'circle']]
BLUE = [['a', 'blue', 'square'], ['a', 'big', 'blue', 'square']]
TRAIN_REFERENCES = [RED, RED, BLUE, BLUE]
TRAIN_CLASSES = ['circle', 'circle', 'square', 'square']
CANDIDATES = [['a', 'red', 'circle'], ['a', 'blue', 'square']]


def toy_scorer():
  return metrics_lib.CiderD(TRAIN_REFERENCES)


def test_consensus_is_the_mean_single_reference_cider():
  scorer = toy_scorer()
  references = RED + BLUE
  got = rerank.consensus_scores(scorer, CANDIDATES, references)
  by_hand = [np.mean([scorer.image_score([r], c) for r in references]) for c in CANDIDATES]
  np.testing.assert_allclose(got, by_hand)
  # Against the red captions alone, the red candidate agrees and the blue one shares only "a".
  red_only = rerank.consensus_scores(scorer, CANDIDATES, RED)
  assert red_only[0] > 1.0 > red_only[1] >= 0.0


def test_reranker_picks_the_candidate_the_neighbours_agree_with():
  scorer = toy_scorer()
  # Image 0 sits among the blue squares, image 1 among the red circles; both beams put red first.
  features = np.array([[0.05, 1.0], [1.0, 0.05]])
  chosen = rerank.rerank(scorer, [CANDIDATES, CANDIDATES], features, TRAIN_FEATURES, TRAIN_REFERENCES, 2)
  assert chosen == [1, 0]
  # The neighbours are those of the nearest-neighbour baseline: cosine similarity, most similar first.
  near = baselines.nearest_training_images(TRAIN_FEATURES, features, 2)
  assert [sorted(n.tolist()) for n in near] == [[2, 3], [0, 1]]
  # k = all four training images: red and blue tie in consensus, and the earlier (the beam's best) wins.
  assert rerank.rerank(scorer, [CANDIDATES], features[:1], TRAIN_FEATURES, TRAIN_REFERENCES, 4) == [0]


def test_class_restriction_overrides_the_nearest_images():
  scorer = toy_scorer()
  features = np.array([[1.0, 0.05]])  # nearest to the red circles
  args = (scorer, [CANDIDATES], features, TRAIN_FEATURES, TRAIN_REFERENCES, 1)
  assert rerank.rerank(*args) == [0]
  assert rerank.rerank(*args, train_labels=TRAIN_CLASSES, classes=['square']) == [1]
  assert rerank.rerank(*args, train_labels=TRAIN_CLASSES, classes=['circle']) == [0]
  with pytest.raises(ValueError, match="class 'triangle' has no training image"):
    rerank.rerank(*args, train_labels=TRAIN_CLASSES, classes=['triangle'])


def test_weight_mixes_in_the_normalised_log_prob_and_empty_slots_never_win():
  scorer = toy_scorer()
  features = np.array([[0.05, 1.0]])  # the neighbours favour blue (candidate 1)
  args = (scorer, [CANDIDATES], features, TRAIN_FEATURES, TRAIN_REFERENCES, 2)
  consensus = rerank.consensus_scores(scorer, CANDIDATES, BLUE + BLUE)
  gap = consensus[1] - consensus[0]
  lengths = np.array([[4, 4]])
  logprobs = np.array([[-1.0, -9.0]])  # red is 2 nats per token likelier
  assert rerank.rerank(*args, logprobs=logprobs, lengths=lengths, weight=0.0) == [1]
  # consensus + w * logp / len: red wins once w * (9 - 1) / 4 exceeds blue's consensus gap.
  assert rerank.rerank(*args, logprobs=logprobs, lengths=lengths, weight=0.4 * gap) == [1]
  assert rerank.rerank(*args, logprobs=logprobs, lengths=lengths, weight=0.6 * gap) == [0]
  # A beam slot that no hypothesis filled (-inf) is never chosen, however it agrees.
  assert rerank.rerank(*args, logprobs=np.array([[-1.0, -np.inf]]), lengths=lengths) == [0]
  with pytest.raises(ValueError, match='k >= 1'):
    rerank.rerank(*args[:-1], 0)


@pytest.fixture(scope='module')
def class_data(tmp_path_factory):
  root = tmp_path_factory.mktemp('rerank')
  return make_class_dataset(root / 'data'), str(root / 'features')


def scene_task(class_data, workdir, **overrides):
  data_dir, cache_dir = class_data
  config = scene_config.get_config('smoke')
  config.data.dir, config.encoder.cache_dir = data_dir, cache_dir
  config = override(config, **overrides)
  captioning.CaptioningTask.validate_config(config)
  task = captioning.CaptioningTask(config, workdir, parallel.make_mesh())
  variables = jit_init(task.model, jax.random.key(0), *task.example_inputs(), train=False)
  return task, variables['params']


def test_task_reranks_the_final_beam_and_k0_leaves_decoding_unchanged(class_data, tmp_path):
  task, params = scene_task(class_data, str(tmp_path), **{'decoding.rerank_neighbours': 2})
  plain = task.decode(params, 'test', 3, 0.0)
  assert task.decode(params, 'test', 3, 0.0, 0) == plain  # k = 0: beam search's own answer
  assert task.decode(params, 'test', 1, 0.0, 2) == task.decode(params, 'test')  # greedy is never reranked
  beams, logprobs, lengths = task.decode_beams(params, 'test', 3, 0.0)
  assert [b[0] for b in beams] == plain and logprobs.shape == lengths.shape == (3, 3)
  assert all(len({tuple(c) for c in b}) > 1 for b in beams)  # an untrained model: the candidates differ
  # The same choice by hand: dihedral-mean test features, train pool = mean of the 8 views, neighbours
  # among the training images of the head's predicted class, document frequencies from train references.
  train_refs = vocab_lib.references(task.entries['train'])
  pool = np.mean([captioning._mean_pooled(v) for v in task.train_views], axis=0)
  by_hand = lambda classes: rerank.rerank(
    metrics_lib.CiderD(train_refs),
    beams,
    captioning._mean_pooled(task.feats['test']),
    pool,
    train_refs,
    2,
    train_labels=task.scene_labels['train'],
    classes=classes,
  )
  chosen = by_hand(task.predicted_scenes(params, 'test'))
  assert task.decode(params, 'test', 3, 0.0, 2) == [b[c] for b, c in zip(beams, chosen)]
  # The neighbours come from the head's predicted class: another prediction, the choice of that class.
  choices = [chosen]
  for shift in (1, 2):
    forced = (np.arange(3) + shift) % 3
    task.predicted_scenes = lambda p, split, forced=forced: forced
    choices.append(by_hand(forced))
    assert task.decode(params, 'test', 3, 0.0, 2) == [b[c] for b, c in zip(beams, choices[-1])]
  assert len({tuple(c) for c in choices}) > 1 and any(any(c) for c in choices)  # the classes change choices


def test_val_rerank_is_one_more_decoding_choice_and_is_recorded(class_data, tmp_path):
  task, params = scene_task(
    class_data,
    str(tmp_path),
    **{
      'decoding.val_rerank': (0, 2),
      'decoding.val_beam_sizes': (1, 3),
      'decoding.val_length_penalties': (0.0, 0.5, 1.0),
      'decoding.val_rerank_template': (),
    },
  )
  assert task._decoding_candidates() == [
    (1, 0.0, 0, False),
    (3, 0.0, 0, False),
    (3, 0.0, 2, False),
    (3, 0.5, 0, False),
    (3, 0.5, 2, False),
    (3, 1.0, 0, False),
    (3, 1.0, 2, False),
  ]
  (beam_size, length_penalty, k, template), tried = task._choose_decoding(params)
  assert [t['rerank_neighbours'] for t in tried] == [0, 0, 2, 0, 2, 0, 2]
  assert not template and all('rerank_template' not in t for t in tried)  # not tried: not recorded
  best = max(tried, key=lambda t: t['val_cider'])
  assert (beam_size, length_penalty, k) == (best['beam_size'], best['length_penalty'], best['rerank_neighbours'])


def test_the_class_template_joins_the_candidates_and_wins_only_when_strictly_better():
  scorer = toy_scorer()
  features = np.array([[0.05, 1.0], [1.0, 0.05]])  # among the blue squares, among the red circles
  args = (scorer, [CANDIDATES[:1], CANDIDATES[:1]], features, TRAIN_FEATURES, TRAIN_REFERENCES, 2)
  assert rerank.rerank(*args) == [0, 0]  # one candidate each: red
  # A blue template for image 0 beats red among blue neighbours (index 1 = past its one candidate); for
  # image 1, a template equal to red ties and the beam's candidate keeps it; None adds nothing.
  assert rerank.rerank(*args, extra=[BLUE[0], RED[0]]) == [1, 0]
  assert rerank.rerank(*args, extra=[None, BLUE[0]]) == [0, 0]
  with pytest.raises(ValueError, match='1 extra candidates for 2 images'):
    rerank.rerank(*args, extra=[BLUE[0]])
  with pytest.raises(ValueError, match='rerank them with weight 0'):
    rerank.rerank(*args, extra=[None, None], logprobs=np.zeros((2, 1)), lengths=np.ones((2, 1)), weight=0.5)


def test_task_template_candidate_is_the_predicted_class_consensus_caption(class_data, tmp_path):
  task, params = scene_task(
    class_data,
    str(tmp_path),
    **{
      'decoding.val_rerank': (2,),
      'decoding.val_beam_sizes': (3,),
      'decoding.val_length_penalties': (0.0, 0.5, 1.0),
      'decoding.val_rerank_template': (False, True),
    },
  )
  assert task._decoding_candidates() == [(3, lp, 2, t) for lp in (0.0, 0.5, 1.0) for t in (False, True)]
  beams, _, _ = task.decode_beams(params, 'test', 3, 0.0)
  train_refs = vocab_lib.references(task.entries['train'])
  scorer = metrics_lib.CiderD(train_refs)
  consensus = baselines.class_consensus(scorer, train_refs, task.scene_labels['train'])
  classes = task.predicted_scenes(params, 'test')
  pool = np.mean([captioning._mean_pooled(v) for v in task.train_views], axis=0)
  features = captioning._mean_pooled(task.feats['test'])
  kwargs = dict(train_labels=task.scene_labels['train'], classes=classes)
  chosen = rerank.rerank(scorer, beams, features, pool, train_refs, 2, extra=[consensus[c] for c in classes], **kwargs)
  expected = [(b + [consensus[c]])[i] for b, c, i in zip(beams, classes, chosen)]
  assert task.decode(params, 'test', 3, 0.0, 2, True) == expected
  # An untrained decoder's beams are poor: the class's own consensus caption wins somewhere.
  assert any(i == 3 for i in chosen) and expected != task.decode(params, 'test', 3, 0.0, 2)
  (_, _, k, template), tried = task._choose_decoding(params)
  assert [t['rerank_template'] for t in tried] == [False, True] * 3 and k == 2
  best = max(tried, key=lambda t: t['val_cider'])
  assert template == best['rerank_template']


def test_rerank_config_is_checked_and_off_by_default():
  config = captioner_config.get_config()
  assert config.decoding.rerank_neighbours == 0 and config.decoding.val_rerank == ()
  validate = captioning.CaptioningTask.validate_config
  with pytest.raises(UserError, match='rerank_neighbours=3 reranks beam candidates, but decoding is greedy'):
    validate(override(captioner_config.get_config(), **{'decoding.rerank_neighbours': 3}))
  with pytest.raises(UserError, match='val_rerank=\\(0, 5\\) reranks beam candidates'):
    validate(override(captioner_config.get_config(), **{'decoding.val_rerank': (0, 5)}))
  with pytest.raises(UserError, match='config.decoding.rerank_neighbours=-1 is invalid'):
    validate(override(captioner_config.get_config(), **{'decoding.rerank_neighbours': -1}))
  validate(override(captioner_config.get_config(), **{'decoding.method': 'beam', 'decoding.rerank_neighbours': 3}))
  assert config.decoding.rerank_template is False and config.decoding.val_rerank_template == ()
  with pytest.raises(UserError, match='rerank_weight=0.5 mixes in log-probs, which the class template'):
    validate(
      override(captioner_config.get_config(), **{'decoding.rerank_weight': 0.5, 'decoding.rerank_template': True})
    )
  with pytest.raises(UserError, match='config.decoding.val_rerank_template=.* is invalid'):
    validate(override(captioner_config.get_config(), **{'decoding.val_rerank_template': (0, 1)}))


def test_template_fallback_gives_the_template_to_the_classes_where_it_won_on_val(class_data, tmp_path):
  task, params = scene_task(
    class_data,
    str(tmp_path),
    **{
      'decoding.val_beam_sizes': (1,),
      'decoding.val_length_penalties': (),
      'decoding.val_rerank': (),
      'decoding.val_rerank_template': (),
      'decoding.template_fallback': True,
    },
  )
  greedy = (1, 0.0, 0, False)
  chosen, table = task.template_fallback(params, greedy)
  # By hand: per predicted val class, mean per-image CIDEr-D of greedy captions and of the class's consensus
  # caption among the training captions (document frequencies: the training references).
  train_refs = vocab_lib.references(task.entries['train'])
  consensus = baselines.class_consensus(metrics_lib.CiderD(train_refs), train_refs, task.scene_labels['train'])
  classes = task.predicted_scenes(params, 'val')
  per_image = lambda hyps: np.array(
    metrics_lib.caption_scores(task.references['val'], hyps, per_image=True)['per_image']['cider']
  )
  decoded, template = per_image(task.decode(params, 'val')), per_image([consensus[c] for c in classes])
  expected = {c for c in set(classes.tolist()) if template[classes == c].mean() > decoded[classes == c].mean()}
  assert chosen == expected and chosen  # an untrained decoder: the templates win somewhere
  for c in set(classes.tolist()):
    row = table[task.scene_classes[c]]
    np.testing.assert_allclose(
      [row['decoded'], row['template']], [decoded[classes == c].mean(), template[classes == c].mean()]
    )
  # final_results: test images of those predicted classes get the template, the others the decoding.
  results = task.final_results(None, params, str(tmp_path))
  assert results['decoding']['template_fallback']['classes'] == sorted(task.scene_classes[c] for c in chosen)
  with open(tmp_path / captioning.CAPTIONS_FILE) as f:
    rows = json.load(f)
  greedy_test = task.decode(params, 'test')
  for row, c, g in zip(rows, task.predicted_scenes(params, 'test'), greedy_test):
    assert row['caption'] == (consensus[c] if c in chosen else g)
