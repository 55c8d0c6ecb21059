"""Karpathy dataset.json loader and the synthetic captioned-scenes generator."""

import json
import logging
import os
import re

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from cnn_caption.data import captions
from cnn_caption.data import synthetic
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UCM_DIR = os.environ.get('CNN_CAPTION_UCM_DIR') or os.path.join(_REPO, '..', 'shared', 'data', 'ucm_captions')


def _sentence(raw, tokens=True):
  s = {'raw': raw}
  if tokens:
    s['tokens'] = raw.split()
  return s


def _write_dataset(root, images, touch=True, filepath='images'):
  """dataset.json with `images` (dicts); creates each image file unless touch=False."""
  os.makedirs(root, exist_ok=True)
  for item in images:
    if filepath is not None:
      item.setdefault('filepath', filepath)
    if touch and isinstance(item.get('filename'), str):
      folder = os.path.join(root, item.get('filepath', 'images'))
      os.makedirs(folder, exist_ok=True)
      open(os.path.join(folder, item['filename']), 'wb').close()
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump({'dataset': 'toy', 'images': images}, f, indent=1)
  return str(root)


def _good_images():
  return [
    {
      'filename': 'a.jpg',
      'split': 'train',
      'sentences': [_sentence('There is A Red circle'), _sentence('a red circle .')],
    },
    {'filename': 'b.jpg', 'split': 'restval', 'sentences': [_sentence('Two blue squares')]},
    {'filename': 'c.jpg', 'split': 'val', 'sentences': [_sentence("It's a green, tiny TRIANGLE!", False)]},
    {'filename': 'd.jpg', 'split': 'test', 'sentences': [_sentence('a yellow square')]},
  ]


def test_load_small_dataset(tmp_path):
  root = _write_dataset(tmp_path / 'toy', _good_images())
  splits = captions.load_karpathy(root)
  assert {k: [e.name for e in v] for k, v in splits.items()} == {
    'train': ['a.jpg', 'b.jpg'],
    'val': ['c.jpg'],
    'test': ['d.jpg'],
  }
  a = splits['train'][0]
  assert a.captions == (('there', 'is', 'a', 'red', 'circle'), ('a', 'red', 'circle', '.'))
  assert a.path == os.path.join(root, 'images', 'a.jpg')
  assert a.split == 'train' and splits['train'][1].split == 'train'  # restval -> train
  # No `tokens`: raw is lower-cased and split into words, punctuation dropped.
  assert splits['val'][0].captions == (("it's", 'a', 'green', 'tiny', 'triangle'),)


def test_image_dir_when_entries_lack_filepath(tmp_path):
  images = _good_images()
  # Default: dataset_dir/images when that folder exists.
  root = _write_dataset(tmp_path / 'with_images', images, filepath=None, touch=False)
  os.makedirs(os.path.join(root, 'images'))
  for item in images:
    open(os.path.join(root, 'images', item['filename']), 'wb').close()
  assert captions.load_karpathy(root)['test'][0].path == os.path.join(root, 'images', 'd.jpg')
  # Default: dataset_dir itself when there is no images/ folder.
  flat = _write_dataset(tmp_path / 'flat', _good_images(), filepath=None, touch=False)
  for item in images:
    open(os.path.join(flat, item['filename']), 'wb').close()
  assert captions.load_karpathy(flat)['test'][0].path == os.path.join(flat, 'd.jpg')
  # Explicit image_dir.
  other = tmp_path / 'elsewhere'
  other.mkdir()
  for item in images:
    (other / item['filename']).touch()
  assert captions.load_karpathy(flat, image_dir=str(other))['test'][0].path == str(other / 'd.jpg')
  with pytest.raises(UserError, match='nowhere'):
    captions.load_karpathy(flat, image_dir=str(tmp_path / 'nowhere'))


def _bad(kind):
  images = _good_images()
  if kind == 'no_sentences':
    images[1]['sentences'] = []
  elif kind == 'missing_sentences':
    del images[1]['sentences']
  elif kind == 'empty_tokens':
    images[1]['sentences'].append({'raw': '', 'tokens': []})
  elif kind == 'empty_raw':
    images[1]['sentences'].append({'raw': ' . ,'})
  elif kind == 'bad_split':
    images[1]['split'] = 'training'
  return images


@pytest.mark.parametrize('kind', ['no_sentences', 'missing_sentences', 'empty_tokens', 'empty_raw', 'bad_split'])
def test_bad_entry_raises_naming_file_and_entry(tmp_path, kind):
  root = _write_dataset(tmp_path / 'toy', _bad(kind))
  with pytest.raises(UserError) as e:
    captions.load_karpathy(root)
  msg = str(e.value)
  assert os.path.join(root, 'dataset.json') in msg and "images[1] ('b.jpg')" in msg and '\n' not in msg


def test_missing_image_raises_naming_image(tmp_path):
  root = _write_dataset(tmp_path / 'toy', _good_images())
  os.remove(os.path.join(root, 'images', 'c.jpg'))
  with pytest.raises(UserError, match=re.escape(os.path.join(root, 'images', 'c.jpg'))):
    captions.load_karpathy(root)


def test_skip_drops_bad_entries_and_logs_count(tmp_path, caplog):
  images = _bad('no_sentences')
  images[3]['sentences'] = [{'tokens': []}]
  root = _write_dataset(tmp_path / 'toy', images)
  os.remove(os.path.join(root, 'images', 'c.jpg'))
  with caplog.at_level(logging.WARNING):
    splits = captions.load_karpathy(root, on_error='skip')
  assert [e.name for e in splits['train']] == ['a.jpg']
  assert splits['val'] == [] and splits['test'] == []
  assert 'skipped 3 of 4 entries' in caplog.text


def test_dataset_level_errors(tmp_path):
  with pytest.raises(UserError, match='nothing_here'):
    captions.load_karpathy(str(tmp_path / 'nothing_here'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match=re.escape(os.path.join(str(tmp_path / 'empty'), 'dataset.json'))):
    captions.load_karpathy(str(tmp_path / 'empty'))
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'dataset.json').write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": train}\n]}')
  with pytest.raises(UserError, match=r'dataset\.json: not valid JSON \(line 3'):
    captions.load_karpathy(str(broken))
  (broken / 'dataset.json').write_text('[1, 2]')
  with pytest.raises(UserError, match='"images" list'):
    captions.load_karpathy(str(broken))
  root = _write_dataset(tmp_path / 'toy', _good_images())
  with pytest.raises(UserError, match="on_error='ignore'"):
    captions.load_karpathy(root, on_error='ignore')


@pytest.mark.parametrize(
  'text',
  [
    '{"images": [{"a": 1}, {"b": [1, {"c": "]}"}]}], "dataset": "x"}',
    ' {"dataset": "x" ,\n "images" : [ ] }\n',
    '{"images": [1], "images_extra": {"images": [2]}}',
    '{"images": [{"a": 1}, ',
    '{"images": [1] } x',
    '{"images": [1,]}',
    '{"images": [1] "x": 2}',
    '{"images": [1], }',
    '',
    'nul',
  ],
)
def test_dataset_json_is_decoded_item_by_item_like_json_load(text):
  """The item-by-item reader gives json's items for valid files and json's message (and position) for bad ones."""
  try:
    expected = json.loads(text)['images']
  except json.JSONDecodeError as e:
    with pytest.raises(json.JSONDecodeError) as got:
      list(captions._karpathy_images(text))
    assert (got.value.msg, got.value.pos) == (e.msg, e.pos)
  else:
    assert list(captions._karpathy_images(text)) == expected


@pytest.mark.parametrize('text', ['{}', '[1, 2]', '{"images": {"a": 1}}', '"images"'])
def test_valid_json_without_an_images_list_is_named(tmp_path, text):
  (tmp_path / 'dataset.json').write_text(text)
  with pytest.raises(UserError, match='expected a JSON object with an "images" list'):
    captions.load_karpathy(str(tmp_path))


def test_duplicate_image_is_a_bad_entry(tmp_path):
  images = _good_images()
  images[3]['filename'] = 'a.jpg'
  root = _write_dataset(tmp_path / 'toy', images)
  with pytest.raises(UserError, match=r"images\[3\] \('a.jpg'\) repeats the image of images\[0\]"):
    captions.load_karpathy(root)


def test_ucm_captions_real_data():
  if not os.path.isfile(os.path.join(UCM_DIR, 'dataset.json')):
    pytest.skip(f'UCM-captions not found at {UCM_DIR} (set CNN_CAPTION_UCM_DIR)')
  splits = captions.load_karpathy(UCM_DIR)
  assert [len(splits[s]) for s in ('train', 'val', 'test')] == [1680, 210, 210]
  train_captions = [c for e in splits['train'] for c in e.captions]
  assert len(train_captions) == 8400
  assert all(len(e.captions) == 5 for s in splits.values() for e in s)
  assert all(w == w.lower() for c in train_captions for w in c)
  assert max(len(c) for c in train_captions) == 22  # SOURCE.md: max 22 tokens
  assert splits['train'][0].path == os.path.join(UCM_DIR, 'images', '1.jpg')
  assert os.path.exists(splits['test'][-1].path)
  vocab = vocab_lib.Vocab.build(train_captions)
  assert len(vocab) == 291 + 4  # SOURCE.md: 291 lower-cased train token types, plus 4 specials
  assert len(vocab_lib.Vocab.build(train_captions, min_count=5)) == 263 + 4  # SOURCE.md: 263 occur >= 5 times


def _files(root):
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_synthetic_is_deterministic_and_loads(tmp_path):
  a = synthetic.make_synthetic_dataset(str(tmp_path / 'a'), 20, image_size=64, seed=3)
  b = synthetic.make_synthetic_dataset(str(tmp_path / 'b'), 20, image_size=64, seed=3)
  files_a, files_b = _files(a), _files(b)
  assert len(files_a) == 21 and files_a == files_b
  c = synthetic.make_synthetic_dataset(str(tmp_path / 'c'), 20, image_size=64, seed=4)
  assert _files(c)['dataset.json'] != files_a['dataset.json']
  assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c']  # no temp folders left behind

  splits = captions.load_karpathy(a)
  assert [len(splits[s]) for s in ('train', 'val', 'test')] == [16, 2, 2]
  assert all(len(e.captions) == 5 and len(set(e.captions)) == 5 for s in splits.values() for e in s)
  with open(os.path.join(a, 'dataset.json')) as f:
    data = json.load(f)
  assert data['dataset'] == 'synthetic'
  assert data['synthetic'] == {'generator': synthetic.GENERATOR, 'num_images': 20, 'image_size': 64, 'seed': 3}
  for entry, item in zip(splits['train'], data['images']):
    for group in item['scene']['objects']:
      words = [group['color'], group['shape'] + ('s' if group['count'] > 1 else '')]
      assert all(all(w in caption for w in words) for caption in entry.captions)
  assert Image.open(splits['test'][0].path).size == (64, 64)


def test_synthetic_split_sizes():
  assert synthetic._split_sizes(600) == (480, 60, 60)
  assert synthetic._split_sizes(48) == (38, 5, 5)
  assert synthetic._split_sizes(3) == (1, 1, 1)


def test_synthetic_is_idempotent_and_replaces_other_parameters(tmp_path):
  out = str(tmp_path / 'syn')
  synthetic.make_synthetic_dataset(out, 10, image_size=32)
  json_path = os.path.join(out, 'dataset.json')
  os.utime(json_path, ns=(1, 1))
  synthetic.make_synthetic_dataset(out, 10, image_size=32)
  assert os.stat(json_path).st_mtime_ns == 1  # untouched: reused
  synthetic.make_synthetic_dataset(out, 12, image_size=32)
  assert os.stat(json_path).st_mtime_ns != 1  # other parameters: rewritten
  assert len(os.listdir(os.path.join(out, 'images'))) == 12
  os.remove(os.path.join(out, 'images', '5.png'))  # incomplete -> rebuilt
  synthetic.make_synthetic_dataset(out, 12, image_size=32)
  assert os.path.exists(os.path.join(out, 'images', '5.png'))
  assert sorted(os.listdir(tmp_path)) == ['syn']


def test_synthetic_refuses_foreign_folder_and_bad_arguments(tmp_path):
  foreign = tmp_path / 'mine'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('keep me')
  with pytest.raises(UserError, match='not a synthetic captioning set'):
    synthetic.make_synthetic_dataset(str(foreign), 10)
  assert (foreign / 'notes.txt').read_text() == 'keep me'
  with pytest.raises(UserError, match='num_images=2'):
    synthetic.make_synthetic_dataset(str(tmp_path / 'x'), 2)
  with pytest.raises(UserError, match='image_size=16'):
    synthetic.make_synthetic_dataset(str(tmp_path / 'x'), 10, image_size=16)


@pytest.mark.parametrize('size', [64, 224])
def test_synthetic_pixels_match_scene(tmp_path, size):
  """Single-group scenes: the shapes' colour, count, cell and shape are visible in the pixels."""
  out = synthetic.make_synthetic_dataset(str(tmp_path / 'syn'), 40, image_size=size, seed=1)
  with open(os.path.join(out, 'dataset.json')) as f:
    items = json.load(f)['images']
  fill = {'circle': (0.7, 0.9), 'square': (0.93, 1.0), 'triangle': (0.4, 0.65)}  # area / bounding box
  checked = 0
  for item in items:
    if len(item['scene']['objects']) != 1:
      continue
    group = item['scene']['objects'][0]
    rgb = np.asarray(Image.open(os.path.join(out, 'images', item['filename'])), np.int32)
    target = np.array(synthetic.COLORS[group['color']])
    mask = np.abs(rgb - target).max(axis=-1) <= 16
    labels, count = ndimage.label(mask)
    assert count == group['count'], item
    row, col = synthetic.POSITIONS[group['position']]
    ys, xs = np.nonzero(mask)
    cell = size / 3
    assert col * cell <= xs.min() and xs.max() < (col + 1) * cell, item
    assert row * cell <= ys.min() and ys.max() < (row + 1) * cell, item
    if size == 224:
      for box in ndimage.find_objects(labels):
        ratio = mask[box].mean()
        assert fill[group['shape']][0] <= ratio <= fill[group['shape']][1], (item, ratio)
    checked += 1
  assert checked >= 15
