"""Vocabulary and host-side caption batching."""

import json
import os

import numpy as np
import pytest

from cnn_caption.data.captions import ImageEntry
from cnn_caption.data.vocab import encode_captions
from cnn_caption.data.vocab import references
from cnn_caption.data.vocab import Vocab
from cnn_caption.errors import UserError

CAPTIONS = [
  ['A', 'red', 'circle'],
  ['a', 'blue', 'square'],
  ['two', 'Red', 'squares', 'a'],
  ['zebra'],
]


def test_build_orders_by_count_then_word_and_lowercases():
  vocab = Vocab.build(CAPTIONS)
  # a: 3, red: 2, then the count-1 words alphabetically.
  assert vocab.words == (
    '<pad>',
    '<bos>',
    '<eos>',
    '<unk>',
    'a',
    'red',
    'blue',
    'circle',
    'square',
    'squares',
    'two',
    'zebra',
  )
  assert len(vocab) == 12
  assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
  assert 'Red' in vocab and 'green' not in vocab


def test_build_is_independent_of_caption_order():
  assert Vocab.build(CAPTIONS) == Vocab.build(CAPTIONS[::-1])


def test_min_count():
  vocab = Vocab.build(CAPTIONS, min_count=2)
  assert vocab.words[4:] == ('a', 'red')
  assert vocab.encode(['a', 'zebra', 'red']) == [4, vocab.unk_id, 5]
  assert len(Vocab.build(CAPTIONS, min_count=4)) == 4  # specials only
  for bad in (0, -1, 1.5, True):
    with pytest.raises(UserError, match='min_count'):
      Vocab.build(CAPTIONS, min_count=bad)


def test_encode_decode_round_trip_and_unknown_words():
  vocab = Vocab.build(CAPTIONS)
  ids = vocab.encode(['Two', 'red', 'circle'])
  assert ids == [10, 5, 7]
  assert vocab.decode(ids) == ['two', 'red', 'circle']
  assert vocab.encode(['a', 'purple', 'circle']) == [4, vocab.unk_id, 7]
  assert vocab.decode(vocab.encode(['a', 'purple', 'circle'])) == ['a', '<unk>', 'circle']
  for caption in CAPTIONS:
    assert vocab.decode(vocab.encode(caption)) == [w.lower() for w in caption]


def test_decode_stops_at_eos_and_drops_pad_bos():
  vocab = Vocab.build(CAPTIONS)
  ids = np.array([vocab.bos_id, 4, vocab.pad_id, 5, vocab.eos_id, 7, 7], np.int32)
  assert vocab.decode(ids) == ['a', 'red']
  assert vocab.decode([vocab.eos_id, 4]) == []
  with pytest.raises(ValueError, match='outside'):
    vocab.decode([4, 99])


def test_save_load_round_trip(tmp_path):
  vocab = Vocab.build(CAPTIONS, min_count=1)
  path = str(tmp_path / 'sub' / 'vocab.json')
  vocab.save(path)
  assert os.listdir(tmp_path / 'sub') == ['vocab.json']  # the temp file was renamed, none left
  loaded = Vocab.load(path)
  assert loaded == vocab and loaded.words == vocab.words
  assert loaded.encode(['two', 'zebra']) == vocab.encode(['two', 'zebra'])
  vocab2 = Vocab.build(CAPTIONS, min_count=2)
  vocab2.save(path)  # overwrites
  assert Vocab.load(path) == vocab2 and Vocab.load(path).min_count == 2


def test_load_missing_or_corrupt(tmp_path):
  missing = str(tmp_path / 'nope.json')
  with pytest.raises(UserError, match='nope.json: vocabulary file not found'):
    Vocab.load(missing)
  bad = tmp_path / 'bad.json'
  bad.write_text('{"format": "cnn_caption.vocab/1", "words": ["a",')
  with pytest.raises(UserError, match='bad.json: corrupt'):
    Vocab.load(str(bad))
  bad.write_text(json.dumps({'words': ['a', 'b']}))
  with pytest.raises(UserError, match='bad.json: not a cnn_caption.vocab/1'):
    Vocab.load(str(bad))
  bad.write_text(json.dumps({'format': 'cnn_caption.vocab/1', 'words': ['a', 'a'], 'counts': None}))
  with pytest.raises(UserError, match='bad.json: corrupt'):
    Vocab.load(str(bad))


def _entries():
  return [
    ImageEntry('x.png', '/x.png', 'train', (('a', 'red', 'circle'), ('two', 'red', 'squares', 'a', 'zebra'))),
    ImageEntry('y.png', '/y.png', 'train', (('A', 'Purple', 'square'),)),
  ]


def test_encode_captions_layout():
  vocab = Vocab.build(CAPTIONS)
  image_index, tokens, lengths = encode_captions(_entries(), vocab, max_len=4)
  bos, eos, unk = vocab.bos_id, vocab.eos_id, vocab.unk_id
  np.testing.assert_array_equal(image_index, [0, 0, 1])
  np.testing.assert_array_equal(
    tokens,
    [
      [bos, 4, 5, 7, eos, 0],  # a red circle
      [bos, 10, 5, 9, 4, eos],  # two red squares a (zebra cut: max_len=4)
      [bos, 4, unk, 8, eos, 0],  # a <unk> square
    ],
  )
  np.testing.assert_array_equal(lengths, [4, 5, 4])
  assert image_index.dtype == tokens.dtype == lengths.dtype == np.int32
  # The targets tokens[:, 1:] hold exactly `lengths` non-pad tokens, the last being EOS.
  targets = tokens[:, 1:]
  np.testing.assert_array_equal((targets != vocab.pad_id).sum(axis=1), lengths)
  np.testing.assert_array_equal(targets[np.arange(3), lengths - 1], [eos] * 3)
  with pytest.raises(UserError, match='max_len'):
    encode_captions(_entries(), vocab, max_len=0)


def test_encode_captions_uses_all_five_captions():
  entries = [
    ImageEntry(f'{k}.png', f'/{k}.png', 'train', tuple((f'img{k}', 'word', f'w{j}') for j in range(5)))
    for k in range(3)
  ]
  vocab = Vocab.build(c for e in entries for c in e.captions)
  image_index, tokens, lengths = encode_captions(entries, vocab, max_len=30)
  assert tokens.shape == (15, 32)
  np.testing.assert_array_equal(image_index, np.repeat(np.arange(3), 5))
  np.testing.assert_array_equal(lengths, [4] * 15)
  decoded = [tuple(vocab.decode(row)) for row in tokens]
  assert decoded == [c for e in entries for c in e.captions]


def test_references_are_lowercased_per_image():
  refs = references(_entries())
  assert refs == [[['a', 'red', 'circle'], ['two', 'red', 'squares', 'a', 'zebra']], [['a', 'purple', 'square']]]
