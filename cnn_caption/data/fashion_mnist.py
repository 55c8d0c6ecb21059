"""Fashion-MNIST from IDX files (Debian's dataset-fashion-mnist) or TFDS, split as the course did."""

from __future__ import annotations

import gzip
import math
import os

from absl import logging
import numpy as np

from cnn_caption.errors import UserError

SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
_FILES = {
  'train_images': 'train-images-idx3-ubyte',
  'train_labels': 'train-labels-idx1-ubyte',
  'test_images': 't10k-images-idx3-ubyte',
  'test_labels': 't10k-labels-idx1-ubyte',
}
NUM_DEV = 10_000
SPLIT_SEED = 42
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_INSTALL_HINT = (
  'install it with `apt-get install dataset-fashion-mnist` (IDX files in '
  f'{SYSTEM_DIR}), or pass --config.data.dir=<folder with the four IDX files>'
)


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
  """Reads one IDX file (optionally gzipped) into a uint8 array; ndim, if given, is the required rank."""
  if os.path.isdir(path):
    raise UserError(f'IDX file {path} is a directory; {_INSTALL_HINT}')
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise UserError(f'cannot read IDX file {path}: {e}; re-install the data ({_INSTALL_HINT})') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise UserError(f'{path} is not a uint8 IDX file (bad magic number); {_INSTALL_HINT}')
  file_ndim = data[3]
  if ndim is not None and file_ndim != ndim:
    raise UserError(
      f'{path} has {file_ndim} dimensions, expected {ndim} '
      f'({"images x rows x columns" if ndim == 3 else "one label per image"}); {_INSTALL_HINT}'
    )
  offset = 4 + 4 * file_ndim
  if len(data) < offset:
    raise UserError(f'{path} is truncated: the header ends early; {_INSTALL_HINT}')
  dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(file_ndim))
  expected = math.prod(dims)
  if len(data) - offset != expected:
    raise UserError(
      f'{path} is truncated or corrupt: {len(data) - offset} bytes of data, expected {expected}; {_INSTALL_HINT}'
    )
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _find_file(directory: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def _load_idx_dir(directory: str) -> dict[str, np.ndarray] | None:
  paths = {k: _find_file(directory, v) for k, v in _FILES.items()}
  if all(p is None for p in paths.values()):
    return None
  missing = [_FILES[k] + '.gz' for k, p in paths.items() if p is None]
  if missing:
    raise UserError(f'{directory} lacks {", ".join(missing)}; {_INSTALL_HINT}')
  return {k: read_idx(p, 1 if k.endswith('labels') else 3) for k, p in paths.items()}


def check_arrays(arrays: dict[str, np.ndarray], source: str, num_classes: int = len(CLASS_NAMES)) -> None:
  """Raises UserError when images and labels disagree: counts, 28x28 images, labels in [0, num_classes)."""
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise UserError(f'{source}: the {split} images have shape {images.shape}, expected (N, 28, 28); ' + _INSTALL_HINT)
    if labels.shape != (images.shape[0],):
      raise UserError(
        f'{source}: {labels.shape[0] if labels.ndim else 0} {split} labels for '
        f'{images.shape[0]} {split} images; the labels and images files must match '
        f'({_INSTALL_HINT})'
      )
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
      fix = (
        f'the labels file is corrupt; {_INSTALL_HINT}'
        if num_classes >= len(CLASS_NAMES)
        else f'set --config.model.num_classes={len(CLASS_NAMES)} (Fashion-MNIST has {len(CLASS_NAMES)} classes)'
      )
      raise UserError(
        f'{source}: {bad.size} {split} labels are outside 0..{num_classes - 1} (first: '
        f'label {int(labels[bad[0]])} at index {int(bad[0])}); {fix}'
      )


def _load_tfds() -> dict[str, np.ndarray] | None:
  """TFDS fashion_mnist if it is prepared or can be downloaded now; None if TFDS is not installed."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return None
  builder = tfds.builder('fashion_mnist')
  if not builder.is_prepared():
    import socket

    # TFDS retries an offline download for minutes: ask the network first and fail at once.
    try:
      socket.create_connection(('storage.googleapis.com', 443), timeout=3).close()
    except OSError:
      raise UserError('Fashion-MNIST not found and TFDS cannot download it (no network); ' + _INSTALL_HINT) from None
    builder.download_and_prepare()
  arrays = {}
  for split in ('train', 'test'):
    ds = builder.as_data_source(split=split)
    examples = [ds[i] for i in range(len(ds))]
    arrays[f'{split}_images'] = np.stack([e['image'][..., 0] for e in examples]).astype(np.uint8)
    arrays[f'{split}_labels'] = np.array([e['label'] for e in examples], np.uint8)
  return arrays


def load_raw(data_dir: str | None = None, num_classes: int = len(CLASS_NAMES)) -> dict[str, np.ndarray]:
  """uint8 train/test images (N, 28, 28) and labels, from data_dir, the system dir, or TFDS; checked."""
  arrays, source = _load_raw(data_dir)
  check_arrays(arrays, source, num_classes)
  return arrays


def _load_raw(data_dir: str | None) -> tuple[dict[str, np.ndarray], str]:
  if data_dir is not None:
    if not os.path.isdir(data_dir):
      raise UserError(f'config.data.dir={data_dir!r} does not exist; {_INSTALL_HINT}')
    arrays = _load_idx_dir(data_dir)
    if arrays is None:
      raise UserError(f'no Fashion-MNIST IDX files in config.data.dir={data_dir!r}; {_INSTALL_HINT}')
    logging.info('Fashion-MNIST from %s', data_dir)
    return arrays, data_dir
  if os.path.isdir(SYSTEM_DIR):
    arrays = _load_idx_dir(SYSTEM_DIR)
    if arrays is not None:
      logging.info('Fashion-MNIST from %s', SYSTEM_DIR)
      return arrays, SYSTEM_DIR
  arrays = _load_tfds()
  if arrays is None:
    raise UserError(
      f'Fashion-MNIST not found in {SYSTEM_DIR} and tensorflow-datasets is not installed; ' + _INSTALL_HINT
    )
  logging.info('Fashion-MNIST from TFDS')
  return arrays, 'TFDS fashion_mnist'


def split_indices(num_train_file: int = 60_000) -> tuple[np.ndarray, np.ndarray]:
  """(train, dev) indices into the training file: dev = first 10,000 of RandomState(42).permutation."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(num_train_file)
  return perm[NUM_DEV:], perm[:NUM_DEV]


def to_float(images_u8: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 pixels / 256, as the course did (done per batch: 4x less memory)."""
  return images_u8.astype(np.float32) / 256.0


def load_splits(
  data_dir: str | None = None,
  num_train: int = 0,
  num_eval: int = 0,
  num_classes: int = len(CLASS_NAMES),
  train_on_val: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'val', 'test'} -> (images uint8 (N, 28, 28, 1), labels int32); num_* > 0 truncates.

  Pixels stay uint8 here; `to_float` scales a batch. Labels must lie in [0, num_classes).
  train_on_val: the training split is all 60,000 images of the training file (the 50,000 then the 10,000 of
  val, before num_train truncates); val is still the same 10,000, no longer held out.
  """
  if num_train < 0 or num_eval < 0:
    raise UserError(f'num_train={num_train} and num_eval={num_eval} must be >= 0 (0 = all)')
  raw = load_raw(data_dir, num_classes)
  if raw['train_images'].shape[0] != 60_000:
    raise UserError(
      f'the Fashion-MNIST training file has {raw["train_images"].shape[0]} images, expected 60000; {_INSTALL_HINT}'
    )
  train_idx, dev_idx = split_indices()
  if train_on_val:
    train_idx = np.concatenate([train_idx, dev_idx])
  splits = {
    'train': (raw['train_images'][train_idx], raw['train_labels'][train_idx]),
    'val': (raw['train_images'][dev_idx], raw['train_labels'][dev_idx]),
    'test': (raw['test_images'], raw['test_labels']),
  }
  out = {}
  for name, (x, y) in splits.items():
    field, limit = ('num_train', num_train) if name == 'train' else ('num_eval', num_eval)
    if limit > len(x):
      raise UserError(
        f'config.data.{field}={limit} asks for more {name} examples than the {len(x)} there are; '
        f'set --config.data.{field} to at most {len(x)} (0 = all)'
      )
    if limit:
      x, y = x[:limit], y[:limit]
    if len(x) == 0:
      raise UserError(f'the {name} split of the Fashion-MNIST data has no examples; {_INSTALL_HINT}')
    out[name] = (x[..., None], y.astype(np.int32))
  return out
