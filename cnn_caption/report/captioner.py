"""The captioner's sections: every test image with its caption, references, scores and attention; per-class scores.

The table's rows travel as one inline JSON array; the inline script renders one page of rows at a time (sorted,
filtered), so a test split of thousands of images stays quick: only the visible page's images are decoded.
"""

from __future__ import annotations

import base64
import collections
import io
import math
import os

from absl import logging
import numpy as np
from PIL import Image

from cnn_caption.captioning import metrics as metrics_lib
from cnn_caption.data import captions as captions_lib
from cnn_caption.errors import UserError
from cnn_caption.report import page
from cnn_caption.report.files import read_json
from cnn_caption.report.files import Run
from cnn_caption.report.page import esc

CAPTIONS_FILE = 'test_captions.json'
ATTENTION_FILE = 'test_attention.npz'
PAGE_SIZE = 100  # table rows rendered at a time
SCORES = (('cider', 'CIDEr-D'), ('bleu4', 'BLEU-4'), ('rouge_l', 'ROUGE-L'))


def thumbnail_url(path: str, size: int) -> str:
  """A JPEG data: URL of the image shrunk to fit size x size pixels; '' when the file cannot be read."""
  try:
    with Image.open(path) as im:
      im = im.convert('RGB')
      im.thumbnail((size, size), Image.Resampling.BILINEAR)
      buf = io.BytesIO()
      im.save(buf, format='JPEG', quality=80)
  except (OSError, ValueError) as e:
    logging.warning('report: no thumbnail for %s (%s)', path, e)
    return ''
  return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


def dataset_entries(run: Run) -> dict[str, captions_lib.ImageEntry]:
  """The data set's entries by image name (paths, references, classes), or {} when it cannot be found."""
  data = run.config.get('data') or {}
  directory = data.get('dir') or data.get('synthetic_dir') or os.path.join(run.workdir, 'synthetic_data')
  try:
    splits = captions_lib.load_karpathy(directory, data.get('image_dir'), on_error='skip')
  except UserError as e:
    logging.warning('report: the images of %s are not available (%s); no thumbnails', run.workdir, e)
    return {}
  return {e.name: e for split in splits.values() for e in split}


def load_attention(path: str) -> dict[str, np.ndarray]:
  """Image name -> (words + 1) x N attention, from test_attention.npz; {} when absent."""
  if not os.path.exists(path):
    return {}
  with np.load(path, allow_pickle=False) as data:
    names, lengths, alphas = data['image_name'], data['length'], data['alphas']
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return {str(n): alphas[offsets[i] : offsets[i + 1]] for i, n in enumerate(names)}


def encode_attention(alphas_TxN: np.ndarray) -> str:
  """Base64 of uint8 maps, each word's scaled so its largest region is 255 (the overlay shows where, not how much)."""
  a = np.asarray(alphas_TxN, np.float32)
  peak = np.maximum(a.max(axis=1, keepdims=True), 1e-12)
  return base64.b64encode(np.round(a / peak * 255).astype(np.uint8).tobytes()).decode('ascii')


def table_rows(run: Run, thumb_size: int | None = None, thumbnails: bool = True) -> tuple[list[dict], int | None, str]:
  """The caption table's rows (one dict per test image), the attention grid side, and a note ('' if none)."""
  captions = read_json(run.path(CAPTIONS_FILE))
  if not isinstance(captions, list):
    raise UserError(f'{run.path(CAPTIONS_FILE)} is not a list of captions; rerun the captioning run to rewrite it')
  entries = dataset_entries(run)
  attention = load_attention(run.path(ATTENTION_FILE))
  size = thumb_size or (128 if len(captions) <= 1000 else 64)
  notes = []
  if not entries:
    notes.append('the data set was not found where config.json says: no thumbnails')
  missing_refs = [i for i, c in enumerate(captions) if 'references' not in c]
  if missing_refs and entries:  # an older test_captions.json: references (and classes) from the data set
    for c in captions:
      entry = entries.get(c['image_name'])
      if entry is not None:
        c.setdefault('references', [' '.join(r) for r in entry.captions])
        if entry.category is not None:
          c.setdefault('class', entry.category)
  if any('bleu4' not in c for c in captions) and all('references' in c for c in captions):
    refs = [[r.split() for r in c['references']] for c in captions]
    for c, b in zip(captions, metrics_lib.sentence_bleu_scores(refs, [c['caption'] for c in captions])):
      c.setdefault('bleu4', b)
  side = None
  for maps in attention.values():
    n = maps.shape[1]
    side = math.isqrt(n) if math.isqrt(n) ** 2 == n else None
    break
  if attention and side is None:
    notes.append('the attention is not over a square grid of regions: no attention overlay')
  rows = []
  for i, c in enumerate(captions):
    entry = entries.get(c['image_name'])
    row = {
      'i': i,
      'name': c['image_name'],
      'words': list(c['caption']),
      'refs': list(c.get('references') or []),
      'cls': c.get('class', ''),
      **{key: _score(c.get(key)) for key, _ in SCORES},
      'img': thumbnail_url(entry.path, size) if entry is not None and thumbnails else '',
    }
    maps = attention.get(c['image_name'])
    if side is not None and maps is not None and len(maps) in (len(row['words']), len(row['words']) + 1):
      row['att'] = encode_attention(maps)  # one map per word, and one for the end unless cut at max_len
    rows.append(row)
  return rows, side, '; '.join(notes)


def _score(value) -> float | None:
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def class_table(rows: list[dict]) -> str:
  """Mean scores per class (worst CIDEr-D first), when the data has a class per image."""
  by_class = collections.defaultdict(list)
  for r in rows:
    if r['cls']:
      by_class[r['cls']].append(r)
  if not by_class:
    return ''
  table_rows = []
  for name, members in by_class.items():
    means = [_mean([m[key] for m in members]) for key, _ in SCORES]
    table_rows.append([name, len(members), *means])
  table_rows.sort(key=lambda r: (r[2] is None, r[2]))
  header = ['class', 'images', *(f'mean {label}' for _, label in SCORES)]
  return '<h3 id="per-class">Per class (worst CIDEr-D first)</h3>' + page.table(
    header, table_rows, numeric={1, 2, 3, 4}, attrs=' id="class-scores"'
  )


def _mean(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def section(run: Run, page_size: int = PAGE_SIZE, thumb_size: int | None = None) -> tuple[str, str]:
  """(HTML, script) of the test captions section."""
  if not os.path.exists(run.path(CAPTIONS_FILE)):
    return (
      f'<h2 id="test">Test captions</h2><p class="note">No {CAPTIONS_FILE} yet (written when the run finishes).</p>',
      '',
    )
  rows, side, note = table_rows(run, thumb_size)
  has_class = any(r['cls'] for r in rows)
  has_attention = any('att' in r for r in rows)
  columns = [('i', '#', 'index'), ('name', 'image', 'image'), ('caption', 'generated caption', 'words')]
  columns.append(('refs', 'references', 'refs'))
  if has_class:
    columns.append(('cls', 'class', 'text'))
  columns += [(key, label, 'num') for key, label in SCORES]
  means = ', '.join(f'{label} {page.fmt(_mean([r[key] for r in rows]))}' for key, label in SCORES)
  hint = ' Hover over (or click) a word of a caption to see where the decoder looked when it chose it.'
  parts = [
    '<h2 id="test">Test captions</h2>',
    f'<p>{len(rows):,} test images; per-image means: {esc(means)}. Click a column header to sort; type to filter by '
    f'caption, reference, image name or class.{hint if has_attention else ""}</p>',
    f'<p class="note">{esc(note)}</p>' if note else '',
    class_table(rows),
    '<h3 id="table">Every test image</h3>',
    interactive_table(rows, columns, side=side, page_size=page_size, sort='cider'),
  ]
  return '\n'.join(p for p in parts if p), SCRIPT


def interactive_table(
  rows: list[dict], columns: list[tuple[str, str, str]], *, side: int | None, page_size: int, sort: str
) -> str:
  """The controls, the empty table and its rows as inline JSON; SCRIPT renders them a page at a time.

  columns: (key in the rows, header, kind); kinds: 'index', 'image' (thumbnail `img`, attention `att`, `name`),
  'words' (a word list, each word hoverable for its attention), 'refs' (a list), 'text', 'num' (4 decimals).
  """
  head = ''.join(
    f'<th data-key="{key}" class="sortable{" num" if kind in ("num", "index") else ""}" title="sort by '
    f'{esc(label)}">{esc(label)}<span class="arrow"></span></th>'
    for key, label, kind in columns
  )
  spec = [{'key': key, 'kind': kind} for key, _, kind in columns]
  return '\n'.join(
    [
      '<div class="controls"><input id="filter" type="search" placeholder="filter: a word, an image name, a class" '
      'size="40"> <button id="prev" type="button">&larr; previous</button> <span id="page-info"></span> '
      '<button id="next" type="button">next &rarr;</button></div>',
      f'<table id="captions"><thead><tr>{head}</tr></thead><tbody></tbody></table>',
      page.json_script(
        'caption-data', {'rows': rows, 'side': side, 'page_size': page_size, 'sort': sort, 'columns': spec}
      ),
    ]
  )


CSS = """
.controls { margin: 0.5em 0; position: sticky; top: 0; background: #fff; padding: 0.3em 0; z-index: 2; }
#captions td { font-size: 0.92em; }
#captions ol { margin: 0; padding-left: 1.3em; color: #444; }
th.sortable { cursor: pointer; user-select: none; white-space: nowrap; }
th.sortable .arrow { color: #1f77b4; padding-left: 0.2em; }
.thumb { position: relative; width: 128px; height: 128px; background: #eee; }
.thumb img, .thumb canvas { position: absolute; left: 0; top: 0; width: 128px; height: 128px; }
.thumb canvas { visibility: hidden; }
.word { cursor: pointer; border-radius: 3px; padding: 0 1px; }
.word:hover, .word.on { background: #ffe08a; }
.word.end { color: #999; font-size: 0.85em; }
.imgname { font-size: 0.8em; color: #666; }
"""

SCRIPT = r"""
(function () {
  'use strict';
  const data = JSON.parse(document.getElementById('caption-data').textContent);
  const rows = data.rows, side = data.side, pageSize = data.page_size;
  const columns = data.columns;
  rows.forEach(function (r) {
    const texts = [r.name];
    columns.forEach(function (c) {
      if (c.kind === 'words') {
        r[c.key] = r.words.join(' ');
        texts.push(r[c.key]);
      } else if (c.kind === 'refs') {
        texts.push(r[c.key].join(' | '));
      } else if (c.kind === 'text') {
        texts.push(r[c.key]);
      }
    });
    r.text = texts.join(' \u0001 ').toLowerCase();
  });
  const state = {key: data.sort, dir: 1, query: '', page: 0, view: []};
  const tbody = document.querySelector('#captions tbody');
  const info = document.getElementById('page-info');
  let pinned = null;

  function sortValue(r, key) {
    const v = r[key];
    if (Array.isArray(v)) return v.length ? v[0] : '';
    return key === 'name' ? r.i : v;  // images in the data set's order
  }
  function applyView() {
    const q = state.query.trim().toLowerCase();
    const view = q ? rows.filter(function (r) { return r.text.indexOf(q) >= 0; }) : rows.slice();
    const key = state.key, dir = state.dir;
    view.sort(function (a, b) {
      const x = sortValue(a, key), y = sortValue(b, key);
      if (x === null && y !== null) return 1;  // no score: last either way
      if (y === null && x !== null) return -1;
      if (x < y) return -dir;
      if (x > y) return dir;
      return a.i - b.i;
    });
    state.view = view;
  }
  function cell(tr, text, cls) {
    const td = document.createElement('td');
    if (cls) td.className = cls;
    if (text !== undefined) td.textContent = text;
    tr.appendChild(td);
    return td;
  }
  function fmt(v) { return v === null || v === undefined ? '\u2013' : v.toFixed(4); }
  function imageCell(td, r) {
    const box = document.createElement('div');
    box.className = 'thumb';
    if (r.img) {
      const img = document.createElement('img');
      img.src = r.img;
      img.alt = r.name;
      box.appendChild(img);
    }
    if (r.att && side) {
      const canvas = document.createElement('canvas');
      canvas.width = side;
      canvas.height = side;
      box.appendChild(canvas);
    }
    td.appendChild(box);
    const name = document.createElement('div');
    name.className = 'imgname';
    name.textContent = r.name;
    td.appendChild(name);
  }
  function wordsCell(td, r) {
    const steps = r.att && side ? attention(r).length / (side * side) : 0;
    r.words.concat(steps > r.words.length ? ['<end>'] : []).forEach(function (w, t) {
      const span = document.createElement('span');
      span.className = 'word' + (t === r.words.length ? ' end' : '');
      span.dataset.t = t;
      span.textContent = w;
      td.appendChild(span);
      td.appendChild(document.createTextNode(' '));
    });
  }
  function refsCell(td, refs) {
    const ol = document.createElement('ol');
    refs.forEach(function (ref) {
      const li = document.createElement('li');
      li.textContent = ref;
      ol.appendChild(li);
    });
    td.appendChild(ol);
  }
  function renderRow(r) {
    const tr = document.createElement('tr');
    tr.dataset.i = r.i;
    columns.forEach(function (c) {
      if (c.kind === 'index') cell(tr, String(r.i), 'num');
      else if (c.kind === 'num') cell(tr, fmt(r[c.key]), 'num');
      else if (c.kind === 'image') imageCell(cell(tr), r);
      else if (c.kind === 'words') wordsCell(cell(tr, undefined, 'cap'), r);
      else if (c.kind === 'refs') refsCell(cell(tr), r[c.key]);
      else cell(tr, r[c.key]);
    });
    return tr;
  }
  function render() {
    const pages = Math.max(1, Math.ceil(state.view.length / pageSize));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * pageSize;
    const frag = document.createDocumentFragment();
    state.view.slice(start, start + pageSize).forEach(function (r) { frag.appendChild(renderRow(r)); });
    tbody.replaceChildren(frag);
    pinned = null;
    const shown = state.view.length;
    info.textContent = 'page ' + (state.page + 1) + ' of ' + pages + ' \u00b7 ' +
      (shown ? (start + 1) + '\u2013' + Math.min(start + pageSize, shown) : '0') + ' of ' + shown + ' images' +
      (shown < rows.length ? ' (filtered from ' + rows.length + ')' : '');
    document.getElementById('prev').disabled = state.page === 0;
    document.getElementById('next').disabled = state.page >= pages - 1;
    document.querySelectorAll('#captions th.sortable').forEach(function (th) {
      const on = th.dataset.key === state.key;
      th.querySelector('.arrow').textContent = on ? (state.dir > 0 ? '\u25b2' : '\u25bc') : '';
      th.setAttribute('aria-sort', on ? (state.dir > 0 ? 'ascending' : 'descending') : 'none');
    });
  }
  function attention(r) {
    if (!r._att) {
      const bin = atob(r.att);
      r._att = new Uint8Array(bin.length);
      for (let k = 0; k < bin.length; k++) r._att[k] = bin.charCodeAt(k);
    }
    return r._att;
  }
  function show(span) {
    const tr = span.closest('tr');
    const r = rows[+tr.dataset.i];
    const canvas = tr.querySelector('canvas');
    if (!canvas || !r.att) return;
    const t = +span.dataset.t, n = side * side, a = attention(r);
    const ctx = canvas.getContext('2d');
    const image = ctx.createImageData(side, side);
    for (let j = 0; j < n; j++) {
      image.data[4 * j + 3] = Math.round((1 - a[t * n + j] / 255) * 210);  // dark where the decoder did not look
    }
    ctx.putImageData(image, 0, 0);
    canvas.style.visibility = 'visible';
    canvas.dataset.word = t;
    tr.querySelectorAll('.word.on').forEach(function (w) { w.classList.remove('on'); });
    span.classList.add('on');
  }
  function hide(tr) {
    const canvas = tr.querySelector('canvas');
    if (canvas) {
      canvas.style.visibility = 'hidden';
      delete canvas.dataset.word;
    }
    tr.querySelectorAll('.word.on').forEach(function (w) { w.classList.remove('on'); });
  }
  tbody.addEventListener('mouseover', function (e) {
    const span = e.target.closest('.word');
    if (span && !pinned) show(span);
  });
  tbody.addEventListener('mouseout', function (e) {
    const span = e.target.closest('.word');
    if (span && !pinned) hide(span.closest('tr'));
  });
  tbody.addEventListener('click', function (e) {
    const span = e.target.closest('.word');
    if (!span) return;
    if (pinned === span) {
      pinned = null;
      hide(span.closest('tr'));
    } else {
      if (pinned) hide(pinned.closest('tr'));
      pinned = span;
      show(span);
    }
  });
  document.querySelectorAll('#captions th.sortable').forEach(function (th) {
    th.addEventListener('click', function () {
      const key = th.dataset.key;
      if (key === state.key) {
        state.dir = -state.dir;
      } else {
        state.key = key;
        state.dir = 1;
      }
      state.page = 0;
      applyView();
      render();
    });
  });
  let timer = null;
  document.getElementById('filter').addEventListener('input', function (e) {
    clearTimeout(timer);
    timer = setTimeout(function () {
      state.query = e.target.value;
      state.page = 0;
      applyView();
      render();
    }, 120);
  });
  document.getElementById('prev').addEventListener('click', function () { state.page -= 1; render(); });
  document.getElementById('next').addEventListener('click', function () { state.page += 1; render(); });
  applyView();
  render();
  document.body.dataset.captionsReady = '1';
})();
"""
