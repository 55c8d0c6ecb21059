"""The report page (cnn_caption/report): what it reads, what it shows, and how it behaves in a real browser.

The browser tests drive Debian's chromium (`apt-get install chromium`) through playwright (the `test` extra);
they skip with one reason line when either is missing. With CNN_CAPTION_REPORT_SCREENSHOTS=<folder> the smoke-run
tests also write report_classifier.png and report_captioner.png there (docs/ holds the committed ones).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw
import pytest

from cnn_caption import inference
from cnn_caption import report
from cnn_caption import train
from cnn_caption.captioning import metrics
from cnn_caption.errors import UserError
from cnn_caption.report import captioner
from cnn_caption.report import charts
from cnn_caption.report import classifier
from conftest import needs_fmnist
from conftest import run_launch

try:
  from playwright.sync_api import sync_playwright
except ImportError:  # the browser tests skip
  sync_playwright = None

CHROMIUM = os.environ.get('CNN_CAPTION_CHROMIUM') or shutil.which('chromium') or '/usr/bin/chromium'
CHROMIUM_FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
]
SCREENSHOTS = os.environ.get('CNN_CAPTION_REPORT_SCREENSHOTS')


def _browser_missing() -> str | None:
  if sync_playwright is None:
    return 'playwright is not installed (pip install -e ".[test]")'
  if not os.access(CHROMIUM, os.X_OK):
    return f'no chromium at {CHROMIUM} (apt-get install chromium, or set CNN_CAPTION_CHROMIUM)'
  return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or '')


@pytest.fixture(scope='module')
def browser():
  """One headless chromium for the module, with a fresh profile folder (no network is tried)."""
  profile = tempfile.mkdtemp(prefix='cnn_caption_chromium_')
  with sync_playwright() as p:
    context = p.chromium.launch_persistent_context(
      profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, viewport={'width': 1280, 'height': 900}
    )
    yield context
    context.close()
  shutil.rmtree(profile, ignore_errors=True)


class Opened:
  """A report opened in the browser, with every console error, page error and non-file request it caused."""

  def __init__(self, context, path: str):
    self.page = context.new_page()
    self.errors: list[str] = []
    self.requests: list[str] = []
    self.page.on('console', lambda m: self.errors.append(m.text) if m.type == 'error' else None)
    self.page.on('pageerror', lambda e: self.errors.append(str(e)))
    self.page.on('request', lambda r: None if r.url.startswith(('file:', 'data:')) else self.requests.append(r.url))
    t = time.perf_counter()
    self.page.goto('file://' + os.path.abspath(path), wait_until='load')
    self.load_seconds = time.perf_counter() - t

  def column(self, index: int) -> list[str]:
    return self.page.eval_on_selector_all(
      '#captions tbody tr', f'rows => rows.map(r => r.children[{index}].textContent)'
    )

  def screenshot(self, name: str) -> None:
    """A full-page PNG in $CNN_CAPTION_REPORT_SCREENSHOTS, reduced to 128 colours (small enough for a README)."""
    if not SCREENSHOTS:
      return
    os.makedirs(SCREENSHOTS, exist_ok=True)
    image = Image.open(io.BytesIO(self.page.screenshot(full_page=True))).convert('RGB')
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(os.path.join(SCREENSHOTS, name), optimize=True)

  def close(self) -> None:
    self.page.close()


def _column_index(opened: Opened, key: str) -> int:
  keys = opened.page.eval_on_selector_all('#captions thead th', 'ths => ths.map(t => t.dataset.key)')
  return keys.index(key)


def _numbers(texts: list[str]) -> list[float]:
  return [float(t) for t in texts]


def _check_sort_and_filter(opened: Opened) -> None:
  """Worst CIDEr-D first by default; a click on the header reverses it; the filter hides non-matching rows."""
  page = opened.page
  col = _column_index(opened, 'cider')
  first = _numbers(opened.column(col))
  assert first == sorted(first), 'default order: worst CIDEr-D first'
  page.click('#captions th[data-key="cider"]')
  second = _numbers(opened.column(col))
  assert second == sorted(second, reverse=True), 'a click on CIDEr-D sorts best first'
  assert page.get_attribute('#captions th[data-key="cider"]', 'aria-sort') == 'descending'
  page.click('#captions th[data-key="cider"]')
  assert _numbers(opened.column(col)) == first
  # The filter: an image name shown in the table, then a string no row holds.
  name_col = _column_index(opened, 'name')
  name = page.eval_on_selector(
    '#captions tbody tr', f'r => r.children[{name_col}].querySelector(".imgname").textContent'
  )
  page.fill('#filter', name)
  page.wait_for_function(
    'n => [...document.querySelectorAll("#captions tbody tr .imgname")].every(e => e.textContent.includes(n))', arg=name
  )
  rows = page.eval_on_selector_all('#captions tbody tr', 'rows => rows.map(r => r.textContent)')
  assert rows and all(name in r for r in rows)
  page.fill('#filter', 'zzz no caption holds this zzz')
  page.wait_for_function('() => document.querySelectorAll("#captions tbody tr").length === 0')
  assert '0 of 0 images' in page.inner_text('#page-info')
  page.fill('#filter', '')
  page.wait_for_function('() => !document.querySelector("#page-info").textContent.includes("filtered")')


def _check_attention_hover(opened: Opened) -> None:
  """Hovering a word shows its map over the thumbnail; another word shows another map; leaving hides it."""
  page = opened.page
  words = page.locator('#captions tbody tr').first.locator('.word')
  assert words.count() >= 2
  canvas = page.locator('#captions tbody tr').first.locator('canvas')
  assert canvas.evaluate('c => getComputedStyle(c).visibility') == 'hidden'
  maps = []
  for t in (0, words.count() - 1):
    words.nth(t).hover()
    assert canvas.evaluate('c => getComputedStyle(c).visibility') == 'visible'
    assert canvas.get_attribute('data-word') == str(t)
    maps.append(canvas.evaluate('c => Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)'))
  alphas = [np.asarray(m).reshape(-1, 4)[:, 3] for m in maps]
  assert all(a.min() < a.max() for a in alphas), 'a map shades some regions more than others'
  page.hover('h1')
  assert canvas.evaluate('c => getComputedStyle(c).visibility') == 'hidden'


def _check_clean(opened: Opened) -> None:
  assert opened.errors == [], opened.errors
  assert opened.requests == [], f'the page asked the network for {opened.requests}'


# ---- smoke runs: the report written at the end of a real training run ----


@pytest.fixture(scope='module')
def classifier_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('classifier') / 'run')
  proc = run_launch('--config=configs/classifier.py:smoke', f'--workdir={workdir}', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def captioner_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('captioner') / 'run')
  proc = run_launch('--config=configs/captioner_attention.py:smoke', f'--workdir={workdir}', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
@needs_fmnist
def test_classifier_run_saves_predictions_consistent_with_results(classifier_run):
  with open(os.path.join(classifier_run, 'results.json')) as f:
    results = json.load(f)
  with np.load(os.path.join(classifier_run, classifier.PREDICTIONS_FILE)) as data:
    label, pred, prob, worst = data['label'], data['pred'], data['prob'], data['mistake_index']
    images = data['mistake_image']
  assert len(label) == results['num_test']
  assert np.mean(pred == label) == results['test_accuracy']  # the same parameters, the same predictions
  assert np.all((prob > 0) & (prob <= 1))
  assert np.all(pred[worst] != label[worst]) and list(prob[worst]) == sorted(prob[worst], reverse=True)
  others = (pred != label) & ~np.isin(np.arange(len(label)), worst)  # mistakes left out of the gallery
  assert len(worst) == min(30, np.sum(pred != label))
  assert not others.any() or prob[worst].min() >= prob[others].max()
  assert images.shape == (len(worst), 28, 28) and images.dtype == np.uint8
  assert os.path.exists(os.path.join(classifier_run, 'report.html'))  # written by the run itself


@pytest.mark.slow
@needs_fmnist
@needs_browser
def test_classifier_report_in_browser(classifier_run, browser):
  opened = Opened(browser, os.path.join(classifier_run, 'report.html'))
  try:
    _check_clean(opened)
    page = opened.page
    with np.load(os.path.join(classifier_run, classifier.PREDICTIONS_FILE)) as data:
      label, pred, worst = data['label'], data['pred'], data['mistake_index']
    cells = page.eval_on_selector_all(
      '#confusion tbody tr', 'rows => rows.map(r => [...r.querySelectorAll("td")].map(td => +td.textContent))'
    )
    counts = np.array([row[:10] for row in cells])
    np.testing.assert_array_equal(counts, classifier.confusion_matrix(label, pred, 10))
    assert page.inner_text('#confusion thead').count('Ankle boot') == 1  # Fashion-MNIST's names
    assert page.locator('#mistakes figure').count() == len(worst) > 0
    first = page.inner_text('#mistakes figure >> nth=0')
    assert f'#{worst[0]}' in first and 'true' in first and 'predicted' in first
    assert page.locator('#mistakes img').evaluate_all('imgs => imgs.every(i => i.complete && i.naturalWidth === 28)')
    assert page.locator('img.filters').evaluate('i => i.naturalWidth > 0')
    assert page.locator('svg.chart').count() >= 2  # loss, validation accuracy
    opened.screenshot('report_classifier.png')
  finally:
    opened.close()


@pytest.mark.slow
def test_captioner_run_saves_scores_and_attention(captioner_run):
  with open(os.path.join(captioner_run, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(captioner_run, 'test_captions.json')) as f:
    rows = json.load(f)
  assert len(rows) == results['num_images']['test']
  assert np.mean([r['bleu4'] for r in rows]) == pytest.approx(results['test_bleu4_sentence_mean'], rel=1e-9)
  assert all(len(r['references']) == 5 for r in rows)  # the synthetic set's five per image
  attention = captioner.load_attention(os.path.join(captioner_run, captioner.ATTENTION_FILE))
  max_len = results['decoding']['max_len']
  for r in rows:
    maps = attention[r['image_name']]
    # One row per word and the end (none for a caption cut at max_len); smoke: 4 regions.
    assert maps.shape == (min(len(r['caption']) + 1, max_len), 4)
    np.testing.assert_allclose(maps.astype(np.float32).sum(1), 1.0, atol=2e-3)  # softmax weights (float16)
  assert os.path.exists(os.path.join(captioner_run, 'report.html'))


@pytest.mark.slow
def test_captioner_attention_is_what_greedy_decoding_used(captioner_run):
  """The saved maps (teacher-forced on the generated caption) equal the ones greedy decoding produced."""
  with open(os.path.join(captioner_run, 'test_captions.json')) as f:
    row = json.load(f)[0]
  attention = captioner.load_attention(os.path.join(captioner_run, captioner.ATTENTION_FILE))
  words, alphas = inference.Captioner(captioner_run).caption(
    os.path.join(captioner_run, 'synthetic_data', 'images', row['image_name'])
  )
  if words != row['caption']:
    pytest.skip('the image decoded from its file gave another caption than from the cached features')
  np.testing.assert_allclose(attention[row['image_name']], alphas[: len(words) + 1], atol=2e-3)  # float16


@pytest.mark.slow
@needs_browser
def test_captioner_report_in_browser(captioner_run, browser):
  opened = Opened(browser, os.path.join(captioner_run, 'report.html'))
  try:
    _check_clean(opened)
    with open(os.path.join(captioner_run, 'test_captions.json')) as f:
      assert opened.page.locator('#captions tbody tr').count() == len(json.load(f))
    assert opened.page.locator('#captions tbody tr img').evaluate_all('imgs => imgs.every(i => i.naturalWidth > 0)')
    _check_sort_and_filter(opened)
    _check_attention_hover(opened)
    if SCREENSHOTS:
      opened.page.locator('#captions tbody tr').first.locator('.word').nth(1).click()  # pin one word's map
      opened.screenshot('report_captioner.png')
  finally:
    opened.close()


# ---- without training: files written directly ----

_WORDS = ('a', 'red', 'blue', 'green', 'square', 'circle', 'triangle', 'at', 'the', 'top', 'bottom', 'and', 'two')
_CLASSES = ('beach', 'forest', 'harbor', 'river', 'runway')


def make_caption_workdir(root: str, num_test: int, *, num_regions: int = 49, image_size: int = 64) -> str:
  """A finished captioning workdir of num_test test images (data set, scores, attention) without any training."""
  rng = np.random.default_rng(0)
  data_dir, workdir = os.path.join(root, 'data'), os.path.join(root, 'run')
  os.makedirs(os.path.join(data_dir, 'images'))
  os.makedirs(workdir)
  entries, rows, maps = [], [], []
  for i in range(num_test):
    image = Image.new('RGB', (image_size, image_size), tuple(int(c) for c in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(2):
      x, y = rng.integers(0, image_size - 16, 2)
      draw.rectangle([int(x), int(y), int(x) + 14, int(y) + 14], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image.save(os.path.join(data_dir, 'images', f'{i}.png'), compress_level=1)
    refs = [list(rng.choice(_WORDS, rng.integers(5, 12))) for _ in range(5)]
    caption = list(rng.choice(_WORDS, rng.integers(4, 12)))
    entries.append(
      {
        'filename': f'{i}.png',
        'filepath': 'images',
        'split': 'test',
        'sentences': [{'tokens': r} for r in refs],
        'class': _CLASSES[i % len(_CLASSES)],
      }
    )
    rows.append(
      {
        'image_name': f'{i}.png',
        'caption': caption,
        'references': [' '.join(r) for r in refs],
        'cider': float(rng.gamma(1.0, 1.0)),
        'bleu4': float(rng.uniform()),
        'rouge_l': float(rng.uniform()),
        'class': _CLASSES[i % len(_CLASSES)],
      }
    )
    logits = rng.normal(size=(len(caption) + 1, num_regions)) * 2
    maps.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
  with open(os.path.join(data_dir, 'dataset.json'), 'w') as f:
    json.dump({'images': entries}, f)
  config = {'task': 'captioning', 'num_epochs': 3, 'batch_size': 8, 'data': {'dir': data_dir}, 'model': {'name': 'x'}}
  history = [
    {'epoch': e, 'step': 10 * e, 'train_loss': 3.0 / e, 'seconds': 1.0, 'val_bleu4': 0.1 * e, 'val_cider': 0.3 * e}
    for e in (1, 2, 3)
  ]
  results = {'num_params': 1234, 'test_bleu4': 0.3, 'test_cider': 0.9, 'best_epoch': 3, 'config': config}
  for name, obj in (('config.json', config), ('results.json', results), ('test_captions.json', rows)):
    with open(os.path.join(workdir, name), 'w') as f:
      json.dump(obj, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in history)
  np.savez_compressed(
    os.path.join(workdir, captioner.ATTENTION_FILE),
    image_name=np.array([r['image_name'] for r in rows]),
    length=np.array([len(m) for m in maps], np.int32),
    alphas=np.concatenate(maps).astype(np.float16),
  )
  return workdir


@needs_browser
@pytest.mark.slow
def test_5000_image_captioning_report_stays_usable(tmp_path, browser):
  """A 5,000-image test split: one self-contained page, rendered 100 rows at a time.

  Measured on 2 shared cores, pytest pinned to one, chromium 156 headless, three runs: the page is 11.3 MB
  (64-pixel JPEG thumbnails, 7x7 attention maps per word, all inline); writing it took 2.1-5.5 s; page.goto to the
  load event took 0.68-1.74 s; the first 100 rows were on screen 2.1-2.2 s after the page was opened (two runs).
  """
  workdir = make_caption_workdir(str(tmp_path), 5000)
  t = time.perf_counter()
  path = report.write_report(workdir)
  write_seconds = time.perf_counter() - t
  size_mb = os.path.getsize(path) / 1e6
  opened = Opened(browser, path)
  try:
    page = opened.page
    page.wait_for_function('() => document.body.dataset.captionsReady === "1"')
    ready_seconds = time.perf_counter() - t - write_seconds
    print(
      f'5000 images: {size_mb:.1f} MB, written in {write_seconds:.1f} s, loaded in {opened.load_seconds:.2f} s, '
      f'first page rendered after {ready_seconds:.2f} s'
    )
    assert size_mb < 40 and opened.load_seconds < 20 and ready_seconds < 60
    _check_clean(opened)
    assert page.locator('#captions tbody tr').count() == 100
    assert page.inner_text('#page-info').startswith('page 1 of 50')
    col = _column_index(opened, 'i')
    first_page = opened.column(col)
    page.click('#next')
    assert page.inner_text('#page-info').startswith('page 2 of 50')
    second_page = opened.column(col)
    assert len(second_page) == 100 and not set(first_page) & set(second_page)
    page.click('#prev')
    assert opened.column(col) == first_page
    _check_sort_and_filter(opened)
    page.fill('#filter', 'harbor')
    page.wait_for_function('() => document.querySelector("#page-info").textContent.includes("filtered")')
    assert page.inner_text('#page-info').startswith('page 1 of 10')  # 1,000 harbour images
    _check_attention_hover(opened)
  finally:
    opened.close()


def test_report_table_rows_and_per_class_scores(tmp_path):
  workdir = make_caption_workdir(str(tmp_path), 12, num_regions=4)
  run = report.files.load_run(workdir)
  rows, side, note = captioner.table_rows(run)
  assert side == 2 and note == ''
  assert [r['name'] for r in rows] == [f'{i}.png' for i in range(12)]
  assert all(r['img'].startswith('data:image/jpeg;base64,') and r['att'] for r in rows)
  html = report.run_page(workdir)
  assert html.count('<tr><td>') >= len(_CLASSES)  # the per-class table
  assert 'id="class-scores"' in html and 'caption-data' in html
  # Self-contained: no address outside the page (the SVG namespace is a name, not a request).
  for marker in ('src="http', 'href="http', '@import', 'url(http'):
    assert marker not in html
  assert "default-src 'none'" in html


def test_older_captioning_workdir_gets_references_bleu_and_classes_from_the_data(tmp_path):
  """test_captions.json written before references, BLEU-4 and classes were in it: the data set supplies them."""
  workdir = make_caption_workdir(str(tmp_path), 6, num_regions=4)
  path = os.path.join(workdir, 'test_captions.json')
  with open(path) as f:
    rows = json.load(f)
  with open(path, 'w') as f:
    json.dump([{k: r[k] for k in ('image_name', 'caption', 'cider', 'rouge_l')} for r in rows], f)
  os.remove(os.path.join(workdir, captioner.ATTENTION_FILE))
  table, side, _ = captioner.table_rows(report.files.load_run(workdir))
  assert side is None and not any('att' in r for r in table)
  assert [r['refs'] for r in table] == [r['references'] for r in rows]
  assert [r['cls'] for r in table] == [r['class'] for r in rows]
  expected = metrics.sentence_bleu_scores(
    [[x.split() for x in r['references']] for r in rows], [r['caption'] for r in rows]
  )
  assert [r['bleu4'] for r in table] == pytest.approx(expected)


def test_report_of_an_unfinished_classifier_run(tmp_path):
  """config.json and metrics.jsonl only (a run in progress): curves and a note, no test section."""
  config = {'task': 'classification', 'num_epochs': 5, 'model': {'name': 'classifier'}}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  (tmp_path / 'metrics.jsonl').write_text(
    ''.join(json.dumps({'epoch': e, 'train_loss': 1.0 / e, 'val_accuracy': 0.5 + e / 10}) + '\n' for e in (1, 2))
    + '{"epoch": 3, "train_lo'  # a torn last line, as a kill leaves it
  )
  html = open(report.write_report(str(tmp_path))).read()
  assert 'in progress or stopped: 2 of 5 epochs' in html
  assert 'No test_predictions.npz' in html
  assert html.count('<svg') == 2


def test_report_mode_without_run_files_is_one_line_error(tmp_path):
  proc = run_launch('--mode=report', f'--workdir={tmp_path}')
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith(f'error: {tmp_path} has no config.json / metrics.jsonl / results.json')
  assert 'Traceback' not in proc.stderr
  assert os.listdir(tmp_path) == []


def test_a_failing_report_never_fails_the_run(tmp_path, caplog):
  (tmp_path / 'config.json').write_text('{not json')
  train.write_report(str(tmp_path))  # logs, does not raise
  assert any('report: not written' in r.getMessage() for r in caplog.records)
  with pytest.raises(UserError, match='config.json: unreadable'):
    report.write_report(str(tmp_path))


def test_sweep_parent_report_compares_its_members(tmp_path):
  runs = []
  for lr, acc in ((0.01, 0.8), (0.1, 0.7)):
    member = tmp_path / f'lr_{lr:g}'
    member.mkdir()
    (member / 'metrics.jsonl').write_text(
      ''.join(json.dumps({'epoch': e, 'train_loss': lr / e, 'val_accuracy': acc * e / 2}) + '\n' for e in (1, 2))
    )
    runs.append({'learning_rate': lr, 'val_accuracy': acc, 'test_accuracy': acc, 'workdir': str(member)})
  (tmp_path / 'lr_0.01' / 'report.html').write_text('<html></html>')
  (tmp_path / 'results.json').write_text(json.dumps({'runs': runs, 'best': runs[0], 'config': {}}))
  html = open(report.write_report(str(tmp_path))).read()
  assert 'href="lr_0.01/report.html"' in html and '>lr 0.1<' in html
  assert html.count('<svg') == 2  # train loss and val accuracy, both members overlaid
  assert 'lr 0.01</text>' in html and 'lr 0.1</text>' in html


@pytest.mark.parametrize('lo, hi', [(0.0, 1.0), (0.48, 0.56), (1e-231, 0.26), (1e-231, 1e-155), (3.0, 3.0), (-2, 7)])
def test_nice_ticks_cover_the_range(lo, hi):
  ticks = charts.nice_ticks(lo, hi)
  assert 3 <= len(ticks) <= 8
  assert ticks[0] <= lo and ticks[-1] >= hi
  steps = np.diff(ticks)
  np.testing.assert_allclose(steps, steps[0], rtol=1e-9)


def test_line_chart_drops_non_finite_points():
  assert charts.line_chart({'a': [(1, float('nan'))]}, 'empty') == ''
  svg = charts.line_chart({'a': [(1, 0.5), (2, float('inf')), (3, 0.7)], 'b': [(1, 0.1)]}, 'two')
  assert svg.count('<polyline') == 2 and svg.count('<circle') == 3
  assert 'a: 0.7 at epoch 3' in svg


def _second_run(workdir_a: str, root: str) -> str:
  """A copy of a caption workdir with other captions and scores on the same images."""
  workdir_b = os.path.join(root, 'run_b')
  shutil.copytree(workdir_a, workdir_b)
  path = os.path.join(workdir_b, 'test_captions.json')
  with open(path) as f:
    rows = json.load(f)
  rng = np.random.default_rng(1)
  for r in rows:
    r['caption'] = ['b'] + r['caption'][:3]
    r['cider'], r['bleu4'] = float(rng.gamma(1.0, 1.0)), float(rng.uniform())
  with open(path, 'w') as f:
    json.dump(rows, f)
  return workdir_b


def test_comparison_page_pairs_the_images(tmp_path):
  workdir_a = make_caption_workdir(str(tmp_path), 30, num_regions=4)
  workdir_b = _second_run(workdir_a, str(tmp_path))
  path = report.write_comparison(workdir_a, workdir_b, resamples=200)
  assert path == os.path.join(workdir_a, 'compare_run_b.html')
  html = open(path).read()
  data = json.loads(html.split('id="caption-data">')[1].split('</script>')[0])
  a = {r['image_name']: r for r in json.load(open(os.path.join(workdir_a, 'test_captions.json')))}
  b = {r['image_name']: r for r in json.load(open(os.path.join(workdir_b, 'test_captions.json')))}
  for row in data['rows']:
    assert row['d_cider'] == pytest.approx(a[row['name']]['cider'] - b[row['name']]['cider'])
    assert row['caption_b'] == ' '.join(b[row['name']]['caption'])
  mean_diff = np.mean([a[n]['cider'] - b[n]['cider'] for n in a])
  assert f'{mean_diff:.4g}' in html.split('id="summary-table"')[1].split('</table>')[0]
  # Other images in B: one line naming both.
  rows_b = list(b.values())[:-1]
  with open(os.path.join(workdir_b, 'test_captions.json'), 'w') as f:
    json.dump(rows_b, f)
  with pytest.raises(UserError, match='captioned different test images'):
    report.write_comparison(workdir_a, workdir_b)


@needs_browser
def test_comparison_page_in_browser(tmp_path, browser):
  workdir_a = make_caption_workdir(str(tmp_path), 150, num_regions=4)
  path = report.write_comparison(workdir_a, _second_run(workdir_a, str(tmp_path)), resamples=200)
  opened = Opened(browser, path)
  try:
    _check_clean(opened)
    page = opened.page
    assert page.locator('#captions tbody tr').count() == 100 and page.inner_text('#page-info').startswith('page 1 of 2')
    col = _column_index(opened, 'd_cider')
    deltas = _numbers(opened.column(col))
    assert deltas == sorted(deltas)  # A's worst against B first
    page.click('#captions th[data-key="d_cider"]')
    deltas = _numbers(opened.column(col))
    assert deltas == sorted(deltas, reverse=True)
    page.fill('#filter', 'b a')  # caption B starts with "b": found by B's caption
    page.wait_for_function('() => document.querySelector("#page-info").textContent.includes("filtered")')
    _check_attention_hover(opened)
  finally:
    opened.close()


def test_compare_mode_needs_a_second_workdir(tmp_path):
  proc = run_launch('--mode=compare', f'--workdir={tmp_path}')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
    'error: --mode=compare needs --compare_to=<the other captioning workdir> beside --workdir'
  )
