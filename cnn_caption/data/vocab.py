"""Word vocabulary for captions, and host-side numpy batching of captions."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from collections.abc import Sequence
import json
import os
import sys

import numpy as np

from cnn_caption import io_utils
from cnn_caption.data.captions import ImageEntry
from cnn_caption.errors import UserError

PAD, BOS, EOS, UNK = '<pad>', '<bos>', '<eos>', '<unk>'
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
_FORMAT = 'cnn_caption.vocab/1'
_REBUILD = 'delete it and rebuild the vocabulary'


class Vocab:
  """Lower-cased word <-> id map: specials first, then words by (-count, word)."""

  def __init__(self, words: Sequence[str], counts: Sequence[int] | None = None, min_count: int = 1):
    """Use Vocab.build or Vocab.load; `words` excludes the specials."""
    self._itos = tuple(SPECIALS) + tuple(words)
    self._stoi = {w: i for i, w in enumerate(self._itos)}
    if len(self._stoi) != len(self._itos):
      raise ValueError('vocabulary words must be distinct and must not repeat the specials')
    self._counts = tuple(counts) if counts is not None else None
    self.min_count = min_count

  @classmethod
  def build(cls, captions: Iterable[Sequence[str]], min_count: int = 1) -> Vocab:
    """Vocabulary of the words seen at least `min_count` times in `captions` (training split only)."""
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
      raise UserError(f'min_count={min_count!r} must be an integer >= 1 (config.data.min_word_count)')
    counter = collections.Counter(w.lower() for caption in captions for w in caption)
    for special in SPECIALS:
      counter.pop(special, None)  # a literal '<unk>' in a caption would be UNK anyway
    kept = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
    return cls([w for w, _ in kept], [c for _, c in kept], min_count)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  @property
  def unk_id(self) -> int:
    return 3

  @property
  def words(self) -> tuple[str, ...]:
    """All entries by id, specials included."""
    return self._itos

  def __len__(self) -> int:
    return len(self._itos)

  def __contains__(self, word: str) -> bool:
    return word.lower() in self._stoi

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocab) and self._itos == other._itos

  def __repr__(self) -> str:
    return f'Vocab({len(self)} entries, min_count={self.min_count})'

  def encode(self, tokens: Sequence[str]) -> list[int]:
    """Ids of the lower-cased tokens; unknown words -> unk_id; no specials added."""
    unk = self.unk_id
    return [self._stoi.get(t.lower(), unk) for t in tokens]

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Words of `ids` up to the first EOS, with PAD and BOS dropped."""
    words = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id):
        continue
      if not 0 <= i < len(self._itos):
        raise ValueError(f'token id {i} is outside the vocabulary of {len(self._itos)}')
      words.append(self._itos[i])
    return words

  def save(self, path: str) -> None:
    """Writes JSON atomically (temp file in the same folder, then os.replace)."""
    payload = {
      'format': _FORMAT,
      'min_count': self.min_count,
      'words': list(self._itos[len(SPECIALS) :]),
      'counts': list(self._counts) if self._counts is not None else None,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    io_utils.atomic_write(path, lambda f: json.dump(payload, f, ensure_ascii=False), binary=False)

  @classmethod
  def load(cls, path: str) -> Vocab:
    """Reads a file written by save(); UserError if it is missing or corrupt."""
    try:
      with open(path, encoding='utf-8') as f:
        payload = json.load(f)
    except FileNotFoundError:
      raise UserError(f'{path}: vocabulary file not found; train first or use the training workdir') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f'{path}: corrupt vocabulary file ({e}); {_REBUILD}') from None
    words = payload.get('words') if isinstance(payload, dict) else None
    counts = payload.get('counts') if isinstance(payload, dict) else None
    if (
      not isinstance(payload, dict)
      or payload.get('format') != _FORMAT
      or not isinstance(words, list)
      or not all(isinstance(w, str) for w in words)
      or (counts is not None and (not isinstance(counts, list) or len(counts) != len(words)))
    ):
      raise UserError(f'{path}: not a {_FORMAT} vocabulary file; {_REBUILD}')
    try:
      return cls(words, counts, int(payload.get('min_count', 1)))
    except (ValueError, TypeError) as e:
      raise UserError(f'{path}: corrupt vocabulary file ({e}); {_REBUILD}') from None


def encode_captions(
  entries: Sequence[ImageEntry], vocab: Vocab, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Training rows: one per (image, caption) pair, every caption of every image.

  Args:
    entries: images, e.g. load_karpathy(...)['train'].
    vocab: the training vocabulary.
    max_len: words kept per caption; longer captions are cut.

  Returns:
    image_index (M,) int32: index into `entries` of each row's image.
    tokens (M, max_len + 2) int32: [BOS, w1..wk, EOS, PAD...] with k <= max_len.
    lengths (M,) int32: k + 1, the number of target tokens (tokens[:, 1:]) including EOS.
  """
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
    raise UserError(f'max_len={max_len!r} must be an integer >= 1 (config.data.max_caption_len)')
  num_rows = sum(len(e.captions) for e in entries)
  image_index = np.empty((num_rows,), np.int32)
  tokens = np.full((num_rows, max_len + 2), vocab.pad_id, np.int32)
  lengths = np.empty((num_rows,), np.int32)
  row = 0
  for i, entry in enumerate(entries):
    for caption in entry.captions:
      ids = vocab.encode(caption[:max_len])
      k = len(ids)
      image_index[row] = i
      tokens[row, 0] = vocab.bos_id
      tokens[row, 1 : k + 1] = ids
      tokens[row, k + 1] = vocab.eos_id
      lengths[row] = k + 1
      row += 1
  return image_index, tokens, lengths


def references(entries: Sequence[ImageEntry]) -> list[list[list[str]]]:
  """Lower-cased reference token lists per image, the BLEU references."""
  # Words are interned by the loader: sys.intern shares one string per word across the references.
  return [[[sys.intern(w.lower()) for w in caption] for caption in entry.captions] for entry in entries]
