"""Karpathy-style `dataset.json` captioning sets (UCM-captions, Sydney-captions, RSICD, synthetic)."""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import json
import os
import re
import sys
from typing import Any

from absl import logging

from cnn_caption.errors import UserError

SPLITS = ('train', 'val', 'test')
# The vocabulary's markers (data/vocab.py): a caption token equal to one would be read as padding, a caption
# start or a caption end. '<unk>' may appear: it means an unknown word either way.
RESERVED_TOKENS = ('<pad>', '<bos>', '<eos>')
_SPLIT_ALIASES = {'train': 'train', 'restval': 'train', 'val': 'val', 'test': 'test'}
_ON_ERROR = ('raise', 'skip')
# Runs of letters/digits, apostrophes inside a word kept ("it's"); all punctuation dropped.
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  """One image with its lower-cased reference captions."""

  name: str  # the entry's `filename`
  path: str  # where the image file is
  split: str  # 'train' | 'val' | 'test'
  captions: tuple[tuple[str, ...], ...]
  label: str | None = None  # the entry's `class` (e.g. UC Merced's land-use class), None when it has none

  @property
  def category(self) -> str | None:
    return self.label

  @property
  def scene_class(self) -> str | None:
    return self.label


class _BadEntry(Exception):
  """One entry of dataset.json is unusable; the message says why and names the file."""


def tokenize(raw: str) -> tuple[str, ...]:
  """Lower-cased words of a raw caption, punctuation dropped."""
  return tuple(_WORD_RE.findall(raw.lower()))


class _NotKarpathy(Exception):
  """The JSON is valid so far but is not an object with an "images" list."""


def _karpathy_images(text: str) -> Iterator[Any]:
  """Yields the items of the top-level object's "images" list one at a time.

  json.load would hold the whole parsed tree at once (about 7x the file: 190 MB for a 26 MB dataset.json of
  20k images) and leave the heap fragmented by the entries kept beside it; decoding item by item keeps only
  the text and one item. Raises json.JSONDecodeError for bad JSON, _NotKarpathy for valid JSON of another shape.
  """
  decoder = json.JSONDecoder()
  ws = re.compile(r'[ \t\n\r]*')

  def skip(i: int) -> int:
    return ws.match(text, i).end()

  def expect(i: int, chars: str, what: str) -> int:
    i = skip(i)
    if i >= len(text) or text[i] not in chars:
      raise json.JSONDecodeError(f'Expecting {what}', text, i)
    return i

  i = skip(0)
  if text[i : i + 1] != '{':
    decoder.raw_decode(text, i)  # a bad document raises here; a valid one is not an object
    raise _NotKarpathy
  i, found = skip(i + 1), False
  if text[i : i + 1] == '}':
    i += 1
  else:
    while True:
      i = expect(i, '"', 'property name enclosed in double quotes')
      key, i = decoder.raw_decode(text, i)
      i = skip(expect(i, ':', "':' delimiter") + 1)
      if key == 'images' and text[i : i + 1] == '[':
        found, i = True, skip(i + 1)
        if text[i : i + 1] == ']':
          i += 1
        else:
          while True:
            item, i = decoder.raw_decode(text, skip(i))
            yield item
            i = expect(i, ',]', "',' delimiter")
            i += 1
            if text[i - 1] == ']':
              break
      else:
        _, i = decoder.raw_decode(text, i)
      i = expect(i, ',}', "',' delimiter")
      i += 1
      if text[i - 1] == '}':
        break
  if skip(i) != len(text):
    raise json.JSONDecodeError('Extra data', text, skip(i))
  if not found:
    raise _NotKarpathy


def _read_images(json_path: str) -> Iterator[Any]:
  """The "images" items of a Karpathy dataset.json, decoded one at a time; one UserError line for bad files."""
  try:
    with open(json_path, encoding='utf-8') as f:
      text = f.read()
    yield from _karpathy_images(text)
  except json.JSONDecodeError as e:
    raise UserError(
      f'{json_path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); repair or re-download the file'
    ) from None
  except _NotKarpathy:
    raise UserError(f'{json_path}: expected a JSON object with an "images" list (Karpathy format)') from None
  except UnicodeDecodeError as e:
    raise UserError(f'{json_path}: not UTF-8 text ({e.reason}); repair or re-download the file') from None
  except OSError as e:
    raise UserError(f'{json_path}: cannot read ({e.strerror}); check the path and permissions') from None


def _caption(sentence: Any, where: str) -> tuple[str, ...]:
  """Lower-cased tokens of one `sentences[]` item: its `tokens`, else its tokenised `raw`."""
  if not isinstance(sentence, dict):
    raise _BadEntry(f'{where} is not an object with "tokens"/"raw"')
  if 'tokens' in sentence:
    tokens = sentence['tokens']
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
      raise _BadEntry(f'{where} "tokens" is not a list of strings')
    words = tuple(sys.intern(w) for w in (t.strip().lower() for t in tokens) if w)
    reserved = sorted(set(words) & set(RESERVED_TOKENS))
    if reserved:
      raise _BadEntry(
        f'{where} holds {", ".join(reserved)}, which the vocabulary reserves for padding and caption '
        'boundaries; drop or respell the token'
      )
  elif isinstance(sentence.get('raw'), str):
    words = tuple(sys.intern(w) for w in tokenize(sentence['raw']))
  else:
    raise _BadEntry(f'{where} has neither "tokens" nor a "raw" string')
  if not words:
    raise _BadEntry(f'{where} is an empty caption')
  return words


def _entry(item: Any, i: int, dataset_dir: str, image_dir: str) -> ImageEntry:
  """Parses images[i]; raises _BadEntry naming what is wrong."""
  if not isinstance(item, dict):
    raise _BadEntry(f'images[{i}] is not an object')
  filename = item.get('filename')
  if not isinstance(filename, str) or not filename:
    raise _BadEntry(f'images[{i}] has no "filename"')
  where = f'images[{i}] ({filename!r})'
  raw_split = item.get('split')
  split = _SPLIT_ALIASES.get(raw_split) if isinstance(raw_split, str) else None
  if split is None:
    raise _BadEntry(f'{where} has split {raw_split!r}; use one of train/restval/val/test')
  sentences = item.get('sentences')
  if not isinstance(sentences, list) or not sentences:
    raise _BadEntry(f'{where} has no sentences')
  captions = tuple(_caption(s, f'{where} sentences[{j}]') for j, s in enumerate(sentences))
  if 'filepath' in item:
    if not isinstance(item['filepath'], str):
      raise _BadEntry(f'{where} "filepath" is not a string')
    path = os.path.join(dataset_dir, item['filepath'], filename)
  else:
    path = os.path.join(image_dir, filename)
  if not os.path.exists(path):
    raise _BadEntry(f'{where} image file {path} not found (fix "filepath"/"filename" or image_dir)')
  if not os.path.isfile(path):
    raise _BadEntry(
      f'{where} image {path} is a {"directory" if os.path.isdir(path) else "special file"}, '
      'not an image file (fix "filepath"/"filename")'
    )
  label = item.get('class')
  if label is not None and (not isinstance(label, str) or not label):
    raise _BadEntry(f'{where} "class" is not a non-empty string')
  return ImageEntry(name=filename, path=path, split=split, captions=captions, label=label)


def load_karpathy(
  dataset_dir: str, image_dir: str | None = None, on_error: str = 'raise'
) -> dict[str, list[ImageEntry]]:
  """Reads `dataset_dir/dataset.json` (Karpathy format) into per-split image entries.

  Captions are lower-cased `tokens` (or the lower-cased words of `raw` when an
  entry has no `tokens`); 'restval' counts as 'train'. An entry's optional
  `class` string becomes its `label`. An image's path is
  dataset_dir/filepath/filename when the entry has `filepath`, else
  image_dir/filename. Image files are only checked to exist, not decoded.

  Args:
    dataset_dir: folder holding dataset.json.
    image_dir: folder of images for entries without `filepath`; None ->
      dataset_dir/images if that folder exists, else dataset_dir.
    on_error: 'raise' stops with a UserError at the first bad entry (no
      sentences, an empty caption, a missing image file, ...); 'skip' skips bad
      entries and logs how many.

  Returns:
    {'train': [...], 'val': [...], 'test': [...]} in dataset.json order.
  """
  if on_error not in _ON_ERROR:
    raise UserError(f'on_error={on_error!r} is unknown; use one of {list(_ON_ERROR)}')
  if not os.path.isdir(dataset_dir):
    raise UserError(
      f'{dataset_dir}: data directory not found; '
      'point config.data.dir at a folder holding a Karpathy-style dataset.json'
    )
  json_path = os.path.join(dataset_dir, 'dataset.json')
  if os.path.isdir(json_path):
    raise UserError(f'{json_path}: is a directory; the data directory must hold a Karpathy-style dataset.json file')
  if not os.path.isfile(json_path):
    raise UserError(f'{json_path}: not found; the data directory must hold a Karpathy-style dataset.json')
  if image_dir is None:
    default = os.path.join(dataset_dir, 'images')
    image_dir = default if os.path.isdir(default) else dataset_dir
  elif not os.path.isdir(image_dir):
    raise UserError(f'{image_dir}: image directory not found; fix config.data.image_dir or leave it unset')

  splits: dict[str, list[ImageEntry]] = {s: [] for s in SPLITS}
  seen_paths: dict[str, int] = {}
  skipped: list[str] = []
  num_items = 0
  for i, item in enumerate(_read_images(json_path)):
    num_items += 1
    try:
      entry = _entry(item, i, dataset_dir, image_dir)
      if entry.path in seen_paths:
        raise _BadEntry(f'images[{i}] ({entry.name!r}) repeats the image of images[{seen_paths[entry.path]}]')
    except _BadEntry as e:
      if on_error == 'raise':
        raise UserError(f"{json_path}: {e}; fix the entry or load with on_error='skip'") from None
      skipped.append(str(e))
      continue
    seen_paths[entry.path] = i
    splits[entry.split].append(entry)

  if skipped:
    logging.warning(
      '%s: skipped %d of %d entries (on_error=skip); first: %s',
      json_path,
      len(skipped),
      num_items,
      skipped[0],
    )
  logging.info(
    '%s: %d train / %d val / %d test images', json_path, len(splits['train']), len(splits['val']), len(splits['test'])
  )
  return splits
