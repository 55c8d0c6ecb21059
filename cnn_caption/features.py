"""Frozen-encoder region features, computed once per image and cached on disk.

Cache layout: `<cache_dir>/<encoder>-<size>px-<key>/` where key hashes the encoder name,
the weights file's identity (real path, byte size, mtime) and the image size (plus a
format version). Inside, one `<image key>.npy` per image (float16, R x C), keyed by
the image's real path, byte size and mtime. A changed weights file or image therefore
gets a fresh entry; nothing is ever read from a stale one. Each entry is written to a
temporary file in the same folder and then `os.replace`d, so a crash never leaves a
half-written entry under its final name.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cnn_caption import io_utils
from cnn_caption import parallel
from cnn_caption.data import images as images_lib
from cnn_caption.errors import UserError
from cnn_caption.models import encoders

_CACHE_VERSION = 1  # bump when preprocessing or the stored format changes
FEATURE_DTYPE = np.float16  # regions are ReLU(6) outputs; float16 halves the cache


def _file_identity(path: str) -> dict:
  stat = os.stat(path)
  return {'path': os.path.realpath(path), 'bytes': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_folder(encoder_name: str, weights_path: str, image_size: int,
                 cache_dir: str) -> tuple[str, dict]:
  """(folder, key): where this (encoder, weights file, image size)'s entries live, and why."""
  key = {'version': _CACHE_VERSION, 'encoder': encoder_name, 'image_size': image_size,
         'weights': _file_identity(weights_path),
         'normalization': images_lib.NORMALIZATION[encoder_name]}
  return os.path.join(cache_dir, f'{encoder_name}-{image_size}px-{_digest(key)[:16]}'), key


def _entry_path(folder: str, image_path: str) -> str:
  return os.path.join(folder, _digest(_file_identity(image_path))[:32] + '.npy')


def _read_entry(path: str, shape: tuple[int, int]) -> np.ndarray | None:
  try:
    feats = np.load(path, allow_pickle=False)
  except (OSError, ValueError):
    return None
  return feats if feats.shape == shape and feats.dtype == FEATURE_DTYPE else None


def _load_batch(paths: list[str], image_size: int, encoder_name: str, on_error: str,
                batch_size: int) -> tuple[np.ndarray, list[str | None]]:
  """Decodes one batch (zero-padded to batch_size); errors[i] is None when image i loaded."""
  x = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  errors: list[str | None] = []
  for i, path in enumerate(paths):
    try:
      x[i] = images_lib.load_image(path, image_size, encoder_name)
      errors.append(None)
    except UserError as e:
      if on_error == 'raise':
        raise
      errors.append(str(e))
  return x, errors


def extract_features(encoder_name: str, weights_path: str | None, image_paths: list[str],
                     image_size: int, cache_dir: str, batch_size: int = 32,
                     on_error: str = 'raise') -> tuple[np.ndarray, np.ndarray]:
  """Frozen region features for every image, from the cache where possible.

  Args:
    encoder_name: 'efficientnet_lite0' or 'resnet18'.
    weights_path: the encoder's `.pth`; None -> the bundled file (efficientnet_lite0 only).
    image_paths: image files in any format `data.images.load_image` reads.
    image_size: square input size in pixels (224 -> 7 x 7 = 49 regions).
    cache_dir: folder for the on-disk cache (created if needed).
    batch_size: images per encoder call; the last batch is zero-padded to this size.
    on_error: 'raise' stops at the first bad image; 'skip' marks it in ok_mask and logs.

  Returns:
    (feats, ok_mask): feats float16 (N, R, C), e.g. (N, 49, 1280), zeros where an image
    failed; ok_mask bool (N,).

  Raises:
    UserError: bad arguments, unreadable weights, or (on_error='raise') a bad image.
  """
  if on_error not in ('raise', 'skip'):
    raise UserError(f"on_error={on_error!r} is unknown; use 'raise' or 'skip'")
  if batch_size < 1:
    raise UserError(f'encoder batch_size={batch_size} must be >= 1')
  if encoder_name not in encoders.ENCODERS:
    raise UserError(f'config.encoder.name={encoder_name!r} is unknown; '
                    f'choose one of {list(encoders.ENCODERS)}')
  if weights_path is None:
    weights_path = encoders.default_weights_path(encoder_name)
  elif not os.path.isfile(weights_path):
    raise UserError(f'encoder weights {weights_path} do not exist; pass '
                    f'--config.encoder.weights=/path/to/{encoder_name}.pth')
  folder, key = cache_folder(encoder_name, weights_path, image_size, cache_dir)
  os.makedirs(folder, exist_ok=True)
  meta_path = os.path.join(folder, 'key.json')
  if parallel.is_main_process() and not os.path.exists(meta_path):
    io_utils.atomic_write(meta_path, lambda f: f.write(json.dumps(key, indent=1).encode()))

  module = encoders.create_encoder(encoder_name)
  regions_shape = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x, features_only=True)[0],
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)).shape[1:]

  num = len(image_paths)
  feats = np.zeros((num, *regions_shape), FEATURE_DTYPE)
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
    cached = _read_entry(entries[i], tuple(regions_shape))
    if cached is None:
      todo.append(i)
    else:
      feats[i], ok_mask[i] = cached, True
  logging.info('features: %d/%d images cached in %s (read in %.1fs); computing %d',
               num - len(todo) - len(failures), num, folder, time.time() - start, len(todo))
  if jax.process_count() > 1:
    # Every process takes process 0's view of the cache, so that the shares below add up exactly.
    todo = [int(i) for i in np.flatnonzero(parallel.from_process_0(np.isin(np.arange(num), todo)))]
  if todo:
    # Each process encodes a contiguous share of whole batches (the batches one process alone would run,
    # so every entry is computed exactly as it would be alone), then all wait for the others.
    batch_size = min(batch_size, len(todo))
    num_batches = -(-len(todo) // batch_size)
    pid, nproc = jax.process_index(), jax.process_count()
    mine = todo[pid * num_batches // nproc * batch_size:(pid + 1) * num_batches // nproc * batch_size]
    if nproc > 1:
      logging.info('features: this process encodes %d of the %d images', len(mine), len(todo))
    failures += parallel.same_verdict(lambda: _compute(encoder_name, weights_path, image_paths, mine, entries,
                                                       image_size, batch_size, on_error, feats, ok_mask))
    by_others = set(todo) - set(mine)
    cached_late = {i for i in range(num) if entries[i] and not ok_mask[i]} - set(todo)  # after this one looked
    for i in sorted(by_others | cached_late):
      cached = _read_entry(entries[i], tuple(regions_shape))
      if cached is None:
        failures.append(f'image {image_paths[i]} could not be encoded (see the other processes\' warnings)')
      else:
        feats[i], ok_mask[i] = cached, True
  if failures:
    logging.warning('features: skipped %d unreadable image(s), e.g. %s', len(failures),
                    failures[:3])
  return feats, ok_mask


def _encode(module, variables, images_BxHxWx3):
  """Region features in the cache dtype; a module-level function so jit reuses compilations."""
  return module.apply(variables, images_BxHxWx3, features_only=True).astype(FEATURE_DTYPE)


def _compute(encoder_name, weights_path, image_paths, todo, entries, image_size, batch_size,
             on_error, feats, ok_mask) -> list[str]:
  """Runs the encoder over image_paths[todo], filling feats/ok_mask and the cache."""
  module, variables = encoders.load_encoder(encoder_name, weights_path)
  forward = functools.partial(jax.jit(_encode, static_argnums=0), module)
  batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
  failures: list[str] = []
  start, done, last_log = time.time(), 0, time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    load = lambda idx: pool.submit(_load_batch, [image_paths[i] for i in idx], image_size,
                                   encoder_name, on_error, batch_size)
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
          feats[i], ok_mask[i] = out[j], True
          io_utils.atomic_write(entries[i], functools.partial(np.save, arr=out[j], allow_pickle=False))
        done += len(idx)
        if time.time() - last_log > 10 or b == len(batches) - 1:
          last_log = time.time()
          logging.info('features: %d/%d computed, %.1f images/s', done, len(todo),
                       done / (last_log - start))
    finally:
      for future in pending:
        future.cancel()
  return failures
