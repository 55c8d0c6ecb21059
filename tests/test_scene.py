"""The scene-aware captioner: dihedral features, the scene-class head, configs/captioner_scene.py end to end."""

import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cnn_caption import inference
from cnn_caption import train
from cnn_caption.captioning import features as features_lib
from cnn_caption.data import augment
from cnn_caption.data import captions as captions_lib
from cnn_caption.models import decoders
from cnn_caption.tasks import captioning
from cnn_caption.training import parallel
from configs import captioner as captioner_config
from configs import captioner_scene as scene_config
from conftest import jit_init
from conftest import override

CLASSES = {'beach': (230, 210, 120), 'forest': (30, 120, 40), 'river': (40, 80, 200)}
CAPTIONS = {
  'beach': ('a sandy beach by the sea', 'yellow sand on a beach', 'the beach is wide'),
  'forest': ('a dense green forest', 'many trees in a forest', 'the forest is green'),
  'river': ('a blue river runs through', 'a river with water', 'the river is long'),
}


def make_class_dataset(root, per_class: int = 4) -> str:
  """A Karpathy folder of 24 px images with a UC Merced-like "class" each (2 train, 1 val, 1 test per class)."""
  images = root / 'images'
  images.mkdir(parents=True)
  entries, rng = [], np.random.default_rng(0)
  for name, color in CLASSES.items():
    for i in range(per_class):
      pixels = np.clip(np.asarray(color) + rng.integers(-30, 31, (24, 24, 3)), 0, 255).astype(np.uint8)
      pixels[: 6 + 3 * i, :4] = 255  # an asymmetric mark, so rotations differ
      filename = f'{name}{i}.png'
      Image.fromarray(pixels).save(images / filename)
      split = 'train' if i < per_class - 2 else ('val' if i == per_class - 2 else 'test')
      sentences = [{'tokens': c.split(), 'raw': c} for c in CAPTIONS[name]]
      entries.append(
        {'filename': filename, 'filepath': 'images', 'split': split, 'class': name, 'sentences': sentences}
      )
  (root / 'dataset.json').write_text(json.dumps({'images': entries}))
  return str(root)


@pytest.fixture(scope='module')
def class_data(tmp_path_factory):
  """A class-labelled data folder and one feature cache shared by this module's tasks and runs."""
  root = tmp_path_factory.mktemp('scene')
  return make_class_dataset(root / 'data'), str(root / 'features')


def scene_smoke(class_data, **overrides):
  data_dir, cache_dir = class_data
  config = scene_config.get_config('smoke')
  config.data.dir, config.encoder.cache_dir = data_dir, cache_dir
  return override(config, **overrides)


def test_dihedral_gives_the_8_distinct_symmetries_and_undo_is_exact():
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 3))
  views = [augment.dihedral(x, t) for t in range(augment.NUM_DIHEDRAL)]
  assert len({v.tobytes() for v in views}) == 8
  # The symmetries of the square, each once: 4 rotations of the image and 4 of its mirror image.
  expected = [np.rot90(y, k, axes=(1, 2)) for y in (x, x[:, :, ::-1]) for k in range(4)]
  assert sorted(v.tobytes() for v in views) == sorted(e.tobytes() for e in expected)
  for t, v in enumerate(views):
    assert np.array_equal(augment.undo_dihedral(v, t), x)
  # Region maps: the regions of a transformed 5x5 map, rotated back, are exactly the original regions.
  regions = x.reshape(2, 25, 3)
  for t in range(augment.NUM_DIHEDRAL):
    back = augment.undo_dihedral_regions(augment.dihedral(x, t).reshape(2, 25, 3), t)
    assert np.array_equal(back, regions)
  with pytest.raises(ValueError, match='square'):
    augment.undo_dihedral_regions(np.zeros((6, 2)), 1)


def test_dihedral_choice_depends_on_seed_and_epoch_only():
  a = captioning.dihedral_choice(0, 3, 500)
  assert np.array_equal(a, captioning.dihedral_choice(0, 3, 500))
  assert set(a.tolist()) == set(range(8))
  assert not np.array_equal(a, captioning.dihedral_choice(1, 3, 500))
  assert not np.array_equal(a, captioning.dihedral_choice(0, 4, 500))


def test_scene_loss_is_zero_weighted_when_off_and_added_when_on():
  def base(params, batch, *, apply_fn, rngs, train):
    return jnp.float32(2.0), {'num_tokens': jnp.float32(5.0)}

  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  apply_fn = lambda variables, feats, method: logits
  batch = {'feats': jnp.zeros((2, 4, 3)), 'scene_label': jnp.array([0, 1])}
  assert captioning.with_scene_loss(base, 0.0) is base
  loss, aux = captioning.with_scene_loss(base, 0.5)(None, batch, apply_fn=apply_fn, rngs={}, train=True)
  logp = np.asarray(jax.nn.log_softmax(logits))
  ce = -(logp[0, 0] + logp[1, 1]) / 2
  assert float(aux['scene_loss']) == pytest.approx(ce, rel=1e-6)
  assert float(loss) == pytest.approx(2.0 + 0.5 * ce, rel=1e-6)
  assert float(aux['scene_correct']) == 0.5  # image 0 right, image 1 (argmax 2) wrong


@pytest.mark.parametrize('every_step', [False, True])
def test_scene_decoder_steps_match_teacher_forcing(every_step):
  model = decoders.CaptionDecoder(
    vocab_size=11, embed_dim=6, hidden_dim=8, scene_head=True, scene_classes=4, scene_embed_dim=3,
    scene_every_step=every_step,
  )  # fmt: skip
  feats = jax.random.normal(jax.random.key(0), (2, 4, 5))
  tokens = jnp.array([[1, 4, 5, 6], [1, 7, 3, 8]])
  params = jit_init(model, jax.random.key(1), feats, tokens, train=False)['params']
  assert params['scene_logits_head']['kernel'].shape == (5, 4)
  assert params['init_h']['kernel'].shape == (5 + 3, 8)  # the mean region and the scene embedding
  assert ('scene_gates' in params) == every_step
  forced, _ = model.apply({'params': params}, feats, tokens, train=False)
  # Two beams per image: the per-image scene gates must reach both rows of each image.
  cache, carry = model.apply({'params': params}, feats, 2, method=decoders.CaptionDecoder.init_state)
  for t in range(tokens.shape[1]):
    carry, logits, _ = model.apply(
      {'params': params}, cache, carry, jnp.repeat(tokens[:, t], 2), method=decoders.CaptionDecoder.step
    )
    np.testing.assert_allclose(logits[::2], forced[:, t], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1::2], forced[:, t], rtol=1e-5, atol=1e-5)
  # The initial state reads the PREDICTED class distribution: other class weights change the captions.
  moved = jax.tree.map(lambda p: p, params)
  moved['scene_logits_head'] = {**params['scene_logits_head'], 'bias': jnp.array([9.0, 0.0, 0.0, 0.0])}
  assert not np.allclose(model.apply({'params': moved}, feats, tokens, train=False)[0], forced)


def test_karpathy_class_is_read_as_scene_class(class_data):
  splits = captions_lib.load_karpathy(class_data[0])
  assert {e.scene_class for e in splits['train']} == set(CLASSES)
  assert [e.scene_class for e in splits['test']] == ['beach', 'forest', 'river']


def test_training_features_are_one_transform_chosen_by_seed_and_epoch(class_data, tmp_path):
  config = scene_smoke(class_data, **{'loss.scene_weight': 1.0})  # a trained head: batches carry the labels
  task = captioning.CaptioningTask(config, str(tmp_path), parallel.make_mesh())
  assert task.scene_classes == sorted(CLASSES) and len(task.train_views) == 8
  steps_per_epoch = task.num_train // config.batch_size
  order = train.epoch_order(config.seed, 1, task.num_train)[: 2 * config.batch_size]
  step = steps_per_epoch  # the first step of epoch 1
  # Two steps in one call (steps_per_call 2) read exactly what the steps read one by one (a resume).
  both = task.train_batch(order, step)
  one = [task.train_batch(order[i * 8 : (i + 1) * 8], step + i) for i in range(2)]
  np.testing.assert_array_equal(both['feats'], np.concatenate([b['feats'] for b in one]))
  np.testing.assert_array_equal(both['scene_label'], np.concatenate([b['scene_label'] for b in one]))
  # Each caption's features are its image's, in the transform dihedral_choice gives it.
  choice = captioning.dihedral_choice(config.seed, 1, task.num_train)[order]
  images = task.image_index[order]
  for row, (t, image) in enumerate(zip(choice, images)):
    np.testing.assert_array_equal(both['feats'][row], np.asarray(task.train_views[t][[image]], np.float32)[0])
  assert len(set(choice.tolist())) > 1
  view = lambda t: np.asarray(task.train_views[t][[0]], np.float32)[0]
  assert not np.allclose(view(0), view(1))  # the images are not symmetric: the transforms' features differ
  # Val and test decode the mean of the 8 transforms (tests: test_dihedral_mean_...), not transform 0.
  assert task.feats['val'].path != task.train_views[0].path
  assert np.array_equal(task.scene_labels['val'], np.arange(3))  # one image per sorted class


def test_dihedral_mean_rotates_each_map_back_before_averaging(class_data, tmp_path):
  data_dir, _ = class_data
  paths = [e.path for e in captions_lib.load_karpathy(data_dir)['test']]
  stores = [
    features_lib.extract_features('efficientnet_lite0', None, paths, 64, class_data[1], 4, transform=t)[0]
    for t in range(8)
  ]
  mean = np.asarray(features_lib.dihedral_mean(stores), np.float32)
  by_hand = np.mean([augment.undo_dihedral_regions(np.asarray(s, np.float32), t) for t, s in enumerate(stores)], 0)
  np.testing.assert_allclose(mean, by_hand, rtol=2e-3, atol=2e-3)  # float16 store
  assert mean.shape == (3, 4, 1280)


def test_existing_configs_leave_the_levers_off():
  config = captioner_config.get_config()
  assert not config.data.dihedral_train and not config.data.dihedral_test
  assert not config.model.scene_head and config.loss.scene_weight == 0.0


@pytest.mark.slow
def test_scene_run_reports_class_accuracy_and_scst_trains_with_the_head(class_data, tmp_path):
  workdir = str(tmp_path / 'xe')
  results = train.train_and_evaluate(scene_smoke(class_data), workdir)
  for split in ('val', 'test'):
    assert 0.0 <= results[f'{split}_scene_accuracy'] <= 1.0
  assert results['scene_classes'] == sorted(CLASSES)
  assert np.isfinite(results['test_cider']) and np.isfinite(results['test_bleu4'])
  history = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert all('val_scene_accuracy' in r for r in history)
  # The trained workdir alone captions a new image (mean of the 8 transforms, scene head from its assets).
  words, _ = inference.Captioner(workdir).caption(os.path.join(class_data[0], 'images', 'beach0.png'))
  assert isinstance(words, list)
  # SCST from it: the scene head and its loss go on.
  config = scene_smoke(class_data)
  scst = scene_config.get_config('scst_smoke')
  scst.data.dir, scst.encoder.cache_dir, scst.init_from = config.data.dir, config.encoder.cache_dir, workdir
  scst.num_epochs, scst.batch_size = 1, 2  # 6 training images
  scst_results = train.train_and_evaluate(scst, str(tmp_path / 'scst'))
  assert np.isfinite(scst_results['test_cider']) and 'test_scene_accuracy' in scst_results


@pytest.mark.slow
def test_scene_smoke_on_synthetic_scenes_trains_the_head_on_their_background_classes(tmp_path):
  config = scene_config.get_config('smoke')
  config.data.synthetic_num_images = 30
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(results['test_cider']) and np.isfinite(results['test_bleu4'])
  assert 0.0 <= results['test_scene_accuracy'] <= 1.0  # synthetic scenes carry their background as a class
  assert os.path.exists(tmp_path / 'run' / captioning.SCENE_CLASSES_FILE)


def test_probe_scene_head_predicts_what_the_probe_predicts_and_stays_frozen(class_data, tmp_path):
  """scene_head_init='probe' folds the baselines' probe (standardisation included) into the head's Dense."""
  from cnn_caption.captioning import baselines

  config = scene_smoke(class_data, scene_head_init='probe', **{'model.scene_head_frozen': True})
  task = captioning.CaptioningTask(config, str(tmp_path), parallel.make_mesh())
  variables = jit_init(task.model, jax.random.key(0), *task.example_inputs(), train=False)
  params = task.initial_params(variables['params'])
  data = task.baseline_data()
  probe = baselines.fit_linear_probe(
    data.train_views.reshape(-1, data.train_views.shape[-1]),
    data.labels['train'] * 8,
    data.features['val'],
    data.labels['val'],
    l2_grid=(config.scene_probe_l2,),
  )
  feats = jnp.asarray(np.asarray(task.feats['test'][:], np.float32))
  logits = task.model.apply({'params': params}, feats, method=decoders.CaptionDecoder.scene_logits)
  by_probe = ((data.features['test'] - probe.mean) / probe.scale) @ probe.weights + probe.bias
  np.testing.assert_allclose(np.asarray(logits), by_probe, rtol=1e-3, atol=1e-3)
  assert [task.scene_classes[i] for i in np.argmax(logits, -1)] == probe.predict(data.features['test'])
  # Frozen: no gradient reaches the head through the scene logits.
  grads = jax.grad(lambda p: task.model.apply({'params': p}, feats, method=decoders.CaptionDecoder.scene_logits).sum())(
    params
  )
  head_grads = [g for k, g in traverse_util.flatten_dict(grads).items() if 'scene_logits_head' in k]
  assert len(head_grads) == 2 and not any(np.any(np.asarray(g)) for g in head_grads)


def test_scene_head_init_must_be_known(class_data):
  from cnn_caption.errors import UserError

  with pytest.raises(UserError, match='scene_head_init'):
    captioning.CaptioningTask.validate_config(scene_smoke(class_data, scene_head_init='kmeans'))
