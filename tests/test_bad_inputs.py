"""Bad inputs end in exit code 2 and one line on stderr naming the culprit, with no traceback and no files changed.

Most cases run in this process through the command-line entry (flags parsed as launch.py does); a few run
launch.py in a subprocess to check the real process boundary. Log lines (absl's `I1128 ...` prefix) are
not counted: a bad input may come after a progress line; the error itself must be one line.
"""

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import zipfile

from absl import flags
import numpy as np
from PIL import Image
import pytest
from test_reliability import write_idx
from test_reliability import write_tensor_pth

from conftest import FMNIST_DIR
from conftest import has_fashion_mnist
from conftest import ROOT
from conftest import run_launch

_LOG_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')
CLASSIFIER = '--config=configs/classifier.py:smoke'
CAPTIONER = '--config=configs/captioner.py:smoke'
STRONG = '--config=configs/classifier.py:strong'


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
  """launch.py's main (flags parsed as cli.run_app does) in this process; returns (exit code, stderr)."""
  from cnn_caption import cli
  import launch

  argv = ['launch.py', *args]
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads the config overrides from sys.argv
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # a config's override flags are defined at parse time, once per process
  capsys.readouterr()
  try:
    launch.main(cli._parse_flags(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def snapshot(directory) -> dict:
  """path -> sha1 of every file under directory (the lock file excluded: it is emptied, never deleted)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      if name != '.lock':
        with open(path, 'rb') as f:
          out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
  return out


def assert_one_clear_line(code: int, stderr: str, culprit: str) -> None:
  lines = [line for line in stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert code == 2, (code, stderr[-3000:])
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  assert culprit in lines[0], (culprit, lines[0])


# (case id, extra args, culprit in the message); config errors, found by config_utils.validate.
CONFIG_CASES = [
  ('seed_negative', [CLASSIFIER, '--config.seed=-1'], 'config.seed=-1'),
  ('seed_2_63', [CLASSIFIER, f'--config.seed={2**63}'], 'config.seed='),
  ('seed_huge', [CLASSIFIER, f'--config.seed={2**70}'], 'config.seed='),
  ('num_epochs_zero', [CLASSIFIER, '--config.num_epochs=0'], 'config.num_epochs=0'),
  ('batch_size_zero', [CLASSIFIER, '--config.batch_size=0'], 'config.batch_size=0'),
  ('eval_batch_negative', [CLASSIFIER, '--config.eval_batch_size=-1'], 'config.eval_batch_size=-1'),
  ('steps_per_call_zero', [CLASSIFIER, '--config.steps_per_call=0'], 'config.steps_per_call=0'),
  ('lr_nan', [CLASSIFIER, '--config.optimizer.learning_rate=nan'], 'config.optimizer.learning_rate=nan'),
  ('lr_inf', [CLASSIFIER, '--config.optimizer.learning_rate=inf'], 'config.optimizer.learning_rate=inf'),
  ('lr_negative', [CLASSIFIER, '--config.optimizer.learning_rate=-0.1'], 'config.optimizer.learning_rate'),
  ('momentum_one', [CLASSIFIER, '--config.optimizer.momentum=1.0'], 'config.optimizer.momentum=1.0'),
  ('weight_decay_negative', [CLASSIFIER, '--config.optimizer.weight_decay=-1.0'], 'weight_decay'),
  ('clip_negative', [CLASSIFIER, '--config.optimizer.grad_clip_norm=-1.0'], 'grad_clip_norm'),
  ('warmup_negative', [CLASSIFIER, '--config.optimizer.warmup_steps=-5'], 'warmup_steps=-5'),
  ('optimizer_unknown', [CLASSIFIER, '--config.optimizer.name=rmsprop'], "optimizer.name='rmsprop'"),
  ('schedule_unknown', [CLASSIFIER, '--config.optimizer.schedule=linear'], "schedule='linear'"),
  ('dropout_one', [CLASSIFIER, '--config.model.dropout=1.0'], 'config.model.dropout=1.0'),
  ('max_to_keep_zero', [CLASSIFIER, '--config.checkpoint.max_to_keep=0'], 'max_to_keep=0'),
  ('every_steps_negative', [CLASSIFIER, '--config.checkpoint.every_steps=-1'], 'every_steps=-1'),
  ('num_train_negative', [CLASSIFIER, '--config.data.num_train=-1'], 'config.data.num_train=-1'),
  ('num_eval_negative', [CLASSIFIER, '--config.data.num_eval=-50'], 'config.data.num_eval=-50'),
  ('num_classes_zero', [CLASSIFIER, '--config.model.num_classes=0'], 'config.model.num_classes=0'),
  ('input_shape_rgb', [CLASSIFIER, '--config.model.input_shape=(28,28,3)'], 'config.model.input_shape'),
  ('input_shape_zero', [CLASSIFIER, '--config.model.input_shape=(0,28,1)'], 'config.model.input_shape'),
  ('unknown_field', [CLASSIFIER, '--config.optimizer.lr=0.1'], '--config.optimizer.lr'),
  ('not_a_number', [CLASSIFIER, '--config.num_epochs=abc'], 'config.num_epochs'),
  ('missing_config_file', ['--config=configs/nope.py'], 'nope.py'),
  ('unknown_variant', ['--config=configs/classifier.py:huge'], 'huge'),
  ('data_dir_missing', [CLASSIFIER, '--config.data.dir=/nonexistent/fmnist'], '/nonexistent/fmnist'),
  ('sweep_lr_negative', [CLASSIFIER, '--config.sweep.learning_rates=(0.1,-1.0)'], 'learning_rates[1]'),
  ('hidden_dim_zero', [CAPTIONER, '--config.model.hidden_dim=0'], 'config.model.hidden_dim=0'),
  ('embed_dim_negative', [CAPTIONER, '--config.model.embed_dim=-3'], 'config.model.embed_dim=-3'),
  ('attention_dim_zero', [CAPTIONER, '--config.model.attention_dim=0'], 'config.model.attention_dim=0'),
  ('length_penalty_nan', [CAPTIONER, '--config.decoding.length_penalty=nan'], 'length_penalty=nan'),
  ('length_penalty_inf', [CAPTIONER, '--config.decoding.length_penalty=inf'], 'length_penalty=inf'),
  ('beam_size_zero', [CAPTIONER, '--config.decoding.beam_size=0'], 'beam_size=0'),
  ('decoding_unknown', [CAPTIONER, '--config.decoding.method=sample'], "decoding.method='sample'"),
  ('max_len_zero', [CAPTIONER, '--config.decoding.max_len=0'], 'decoding.max_len=0'),
  ('image_size_zero', [CAPTIONER, '--config.data.image_size=0'], 'image_size=0'),
  ('caption_len_zero', [CAPTIONER, '--config.data.max_caption_len=0'], 'max_caption_len=0'),
  ('on_error_unknown', [CAPTIONER, '--config.data.on_error=ignore'], "on_error='ignore'"),
  ('synthetic_images_zero', [CAPTIONER, '--config.data.synthetic_num_images=0'], 'synthetic_num_images=0'),
  ('encoder_batch_zero', [CAPTIONER, '--config.encoder.batch_size=0'], 'encoder.batch_size=0'),
  ('vocab_size_zero', [CAPTIONER, '--config.model_inputs.vocab_size=0', '--mode=summary'], 'vocab_size=0'),
  ('model_unknown', [CLASSIFIER, '--config.model.name=nosuch', '--mode=summary'], "model.name='nosuch'"),
  ('restore_step_negative', [CLASSIFIER, '--config.checkpoint.restore_step=-1'], 'restore_step=-1'),
  ('imagenet_predict_classifier', [CLASSIFIER, '--mode=imagenet_predict', '--images=x.png'], 'no pretrained encoder'),
  ('train_q1_config', ['--config=configs/q1_cnn.py'], 'has no config.task'),
  ('attention_check_classifier', [CLASSIFIER, '--mode=attention_check'], "model.name='classifier'"),
  ('mode_unknown', [CLASSIFIER, '--mode=fly'], 'fly'),
  ('baselines_classifier', [CLASSIFIER, '--mode=baselines'], "config.task='classification'"),
  ('baselines_q1_config', ['--config=configs/q1_cnn.py', '--mode=baselines'], 'config.task=None'),
  ('strong_hidden_zero', [STRONG, '--config.model.hidden=0'], 'config.model.hidden=0'),
  ('strong_channels_zero', [STRONG, '--config.model.channels=(0,8)'], 'config.model.channels=(0, 8)'),
  ('strong_convs_empty', [STRONG, '--config.model.convs_per_stage=()'], 'config.model.convs_per_stage=()'),
  ('strong_groups_zero', [STRONG, '--config.model.groups=0'], 'config.model.groups=0'),
  ('strong_space_to_depth_zero', [STRONG, '--config.model.space_to_depth=0'], 'space_to_depth=0'),
  ('bn_stats_zero', [STRONG, '--config.data.bn_stats_examples=0'], 'bn_stats_examples=0'),
  ('doubly_stochastic_negative', [CAPTIONER, '--config.loss.doubly_stochastic=-1.0'], 'doubly_stochastic=-1.0'),
  ('xla_option_unknown', [CLASSIFIER, '--config.xla_options=xla_cpu_nosuch=1'], "option: 'xla_cpu_nosuch'"),
  ('xla_option_bad_value', [CAPTIONER, '--config.xla_options=xla_cpu_use_onednn=maybe'], 'xla_cpu_use_onednn'),
  ('xla_option_no_value', [CLASSIFIER, '--config.xla_options=xla_cpu_use_onednn'], "item 'xla_cpu_use_onednn'"),
  ('eval_xla_option_unknown', [CLASSIFIER, '--config.eval_xla_options=xla_cpu_nosuch=1'], 'config.eval_xla_options'),
  ('eval_xla_option_no_value', [CAPTIONER, '--config.eval_xla_options=xla_cpu_use_onednn'], 'config.eval_xla_options'),
  ('q1_padding_unknown', ['--config=configs/q1_cnn.py', '--mode=summary', '--config.model.padding=FULL'], 'padding'),
]


@pytest.mark.parametrize('case, args, culprit', CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(monkeypatch, capsys, tmp_path, case, args, culprit):
  del case
  (tmp_path / 'keep.txt').write_text('mine')
  before = snapshot(tmp_path)
  assert_one_clear_line(*run_cli(monkeypatch, capsys, f'--workdir={tmp_path}', *args), culprit)
  assert snapshot(tmp_path) == before


@pytest.fixture(scope='module')
def fmnist_files(tmp_path_factory):
  """The real Fashion-MNIST IDX files, decompressed once (reading a plain file is fast)."""
  if not has_fashion_mnist():
    pytest.skip(f'Fashion-MNIST not in {FMNIST_DIR}')
  out = tmp_path_factory.mktemp('fmnist')
  for name in os.listdir(FMNIST_DIR):
    with gzip.open(os.path.join(FMNIST_DIR, name)) as src, open(out / name[:-3], 'wb') as dst:
      shutil.copyfileobj(src, dst)
  return out


def _labels(n, value=None):
  return np.full(n, value, np.uint8) if value is not None else np.arange(n, dtype=np.uint8) % 10


# (case id, file to replace, writer(path, good_folder), culprit)
IDX_CASES = [
  (
    'test_labels_short',
    't10k-labels-idx1-ubyte',
    lambda p, g: write_idx(p, _labels(9000)),
    '9000 test labels for 10000 test images',
  ),
  (
    'train_labels_out_of_range',
    'train-labels-idx1-ubyte',
    lambda p, g: write_idx(p, _labels(60000, 10)),
    'train labels are outside 0..9',
  ),
  (
    'test_label_byte_255',
    't10k-labels-idx1-ubyte',
    lambda p, g: write_idx(p, np.r_[_labels(9999), [255]].astype(np.uint8)),
    'label 255 at index 9999',
  ),
  (
    'test_images_2d',
    't10k-images-idx3-ubyte',
    lambda p, g: write_idx(p, np.zeros((10000, 784))),
    't10k-images-idx3-ubyte has 2 dimensions',
  ),
  (
    'train_images_truncated',
    'train-images-idx3-ubyte',
    lambda p, g: p.write_bytes((g / 'train-images-idx3-ubyte').read_bytes()[:-1000]),
    'train-images-idx3-ubyte is truncated',
  ),
  (
    'bad_magic',
    't10k-labels-idx1-ubyte',
    lambda p, g: p.write_bytes(b'\x08\x03\x00\x00' + bytes(100)),
    'bad magic number',
  ),
  ('labels_file_is_folder', 't10k-labels-idx1-ubyte', lambda p, g: p.mkdir(), 'is a directory'),
  (
    'train_only_100_images',
    'train-images-idx3-ubyte',
    lambda p, g: write_idx(p, np.zeros((100, 28, 28))),
    '60000 train labels for 100 train images',
  ),
]


@pytest.mark.parametrize('case, name, write, culprit', IDX_CASES, ids=[c[0] for c in IDX_CASES])
def test_bad_idx_data(monkeypatch, capsys, tmp_path, fmnist_files, case, name, write, culprit):
  del case
  data = tmp_path / 'data'
  data.mkdir()
  for good in os.listdir(fmnist_files):
    if good != name:
      os.symlink(fmnist_files / good, data / good)
  write(data / name, fmnist_files)
  workdir = tmp_path / 'work'
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', f'--config.data.dir={data}')
  assert_one_clear_line(code, err, culprit)
  assert not (workdir / 'checkpoints').exists()


def _png(path, size=8):
  Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(path)


def _karpathy(folder, images=None, text=None):
  """A captions folder with three PNGs and a dataset.json (images list or raw text)."""
  os.makedirs(folder / 'images', exist_ok=True)
  for i in range(3):
    _png(folder / 'images' / f'{i}.png')
  if images is None:
    images = [
      {'filename': f'{i}.png', 'split': s, 'sentences': [{'tokens': ['a', 'b']}]}
      for i, s in enumerate(('train', 'val', 'test'))
    ]
  (folder / 'dataset.json').write_text(text if text is not None else json.dumps({'images': images}))


def _entry(name='0.png', split='train', sentences=None):
  return {'filename': name, 'split': split, 'sentences': [{'tokens': ['a']}] if sentences is None else sentences}


CAPTION_CASES = [
  ('json_invalid', dict(text='{"images": ['), 'not valid JSON'),
  ('json_not_object', dict(text='[1, 2]'), 'expected a JSON object with an "images" list'),
  ('no_sentences', dict(images=[_entry(sentences=[])]), "images[0] ('0.png') has no sentences"),
  ('empty_caption', dict(images=[_entry(sentences=[{'tokens': []}])]), 'is an empty caption'),
  ('bad_split', dict(images=[_entry(split='dev')]), "has split 'dev'"),
  ('missing_image', dict(images=[_entry(name='9.png')]), '9.png not found'),
  ('duplicate_image', dict(images=[_entry(), _entry()]), 'repeats the image of images[0]'),
  ('no_test_split', dict(images=[_entry('0.png', 'train'), _entry('1.png', 'val')]), 'has no test images'),
  ('tokens_not_strings', dict(images=[_entry(sentences=[{'tokens': [1, 2]}])]), 'is not a list of strings'),
]


@pytest.mark.parametrize('case, spec, culprit', CAPTION_CASES, ids=[c[0] for c in CAPTION_CASES])
def test_bad_caption_data(monkeypatch, capsys, tmp_path, case, spec, culprit):
  del case
  data = tmp_path / 'data'
  _karpathy(data, **spec)
  code, err = run_cli(monkeypatch, capsys, CAPTIONER, f'--workdir={tmp_path / "work"}', f'--config.data.dir={data}')
  assert_one_clear_line(code, err, culprit)


def test_image_folder_as_an_image_entry(monkeypatch, capsys, tmp_path):
  data = tmp_path / 'data'
  _karpathy(data)
  os.remove(data / 'images' / '1.png')
  os.mkdir(data / 'images' / '1.png')
  code, err = run_cli(monkeypatch, capsys, CAPTIONER, f'--workdir={tmp_path / "work"}', f'--config.data.dir={data}')
  assert_one_clear_line(code, err, '1.png is a directory')


def _garbage(path):
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)


IMAGE_CASES = [
  ('dev_null', lambda t: '/dev/null', 'not a regular file'),
  ('directory', lambda t: str(t), 'is a directory'),
  ('missing', lambda t: str(t / 'nope.png'), 'nope.png does not exist'),
  ('empty', lambda t: str(_file(t / 'e.png', '')), 'e.png is empty'),
  ('garbage', lambda t: _garbage(t / 'g.png') or str(t / 'g.png'), 'g.png cannot be read'),
]


@pytest.mark.parametrize('case, make, culprit', IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_image(monkeypatch, capsys, tmp_path, case, make, culprit):
  del case
  path = make(tmp_path)
  code, err = run_cli(monkeypatch, capsys, CAPTIONER, '--mode=imagenet_predict', f'--images={path}')
  assert_one_clear_line(code, err, culprit)


def _legacy_truncated(path):
  data = open(os.path.join(ROOT, 'tests', 'data', 'tiny_state_legacy.pth'), 'rb').read()
  path.write_bytes(data[:-10])


WEIGHT_CASES = [
  ('stride0_bomb', lambda p, mp: write_tensor_pth(p, mp, 1, (10**6, 10**6), (0, 0)), 'GiB limit'),
  ('stride0_expand', lambda p, mp: write_tensor_pth(p, mp, 1, (1000, 1000), (0, 0)), 'claims 1000000'),
  ('garbage', lambda p, mp: p.write_bytes(b'not a pickle'), 'not a readable PyTorch state dict'),
  ('truncated', lambda p, mp: _legacy_truncated(p), 'not a readable PyTorch state dict'),
  ('zip_without_pickle', lambda p, mp: zipfile.ZipFile(p, 'w').close(), 'without exactly one data.pkl'),
  ('other_model', lambda p, mp: shutil.copy(os.path.join(ROOT, 'tests', 'data', 'tiny_state_zip.pth'), p), 'w.pth'),
]


@pytest.mark.parametrize('case, make, culprit', WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights(monkeypatch, capsys, tmp_path, case, make, culprit):
  del case
  path = tmp_path / 'w.pth'
  make(path, monkeypatch)
  monkeypatch.delitem(sys.modules, 'torch', raising=False)
  _png(tmp_path / 'x.png')
  code, err = run_cli(
    monkeypatch,
    capsys,
    CAPTIONER,
    '--mode=imagenet_predict',
    f'--images={tmp_path / "x.png"}',
    f'--config.encoder.weights={path}',
  )
  assert_one_clear_line(code, err, culprit)


def test_missing_weights_file(monkeypatch, capsys, tmp_path):
  code, err = run_cli(
    monkeypatch,
    capsys,
    CAPTIONER,
    '--mode=imagenet_predict',
    f'--images={tmp_path}/x.png',
    f'--config.encoder.weights={tmp_path}/none.pth',
  )
  assert_one_clear_line(code, err, 'none.pth do not exist')


def _file(path, text='x'):
  path.write_text(text)
  return path


WORKDIR_CASES = [
  ('is_a_file', lambda t: str(_file(t / 'f')), 'is a file, not a folder'),
  ('not_creatable', lambda t: '/proc/no/such/workdir', 'cannot create --workdir=/proc/no/such/workdir'),
  ('read_only', lambda t: '/sys/kernel', 'is not writable'),
  ('under_a_file', lambda t: str(_file(t / 'f') / 'sub'), 'cannot create'),
]


@pytest.mark.parametrize('case, make, culprit', WORKDIR_CASES, ids=[c[0] for c in WORKDIR_CASES])
def test_bad_workdir(monkeypatch, capsys, tmp_path, case, make, culprit):
  del case
  workdir = make(tmp_path)
  assert_one_clear_line(*run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}'), culprit)


def test_missing_workdir_flag(monkeypatch, capsys):
  assert_one_clear_line(*run_cli(monkeypatch, capsys, CLASSIFIER), '--workdir is required')


def test_invalid_config_json_in_a_caption_workdir(monkeypatch, capsys, tmp_path):
  (tmp_path / 'config.json').write_text('{"model": ')
  _png(tmp_path / 'x.png')
  before = snapshot(tmp_path)
  code, err = run_cli(monkeypatch, capsys, '--mode=caption', f'--workdir={tmp_path}', f'--images={tmp_path}/x.png')
  assert_one_clear_line(code, err, 'config.json')
  assert snapshot(tmp_path) == before


def test_caption_workdir_without_config(monkeypatch, capsys, tmp_path):
  code, err = run_cli(monkeypatch, capsys, '--mode=caption', f'--workdir={tmp_path}', f'--images={tmp_path}/x.png')
  assert_one_clear_line(code, err, 'config.json not found')


def test_full_disk_is_one_line(monkeypatch, capsys, tmp_path):
  from cnn_caption.training import workdir_lock

  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)  # the lock is the first file written

  monkeypatch.setattr(workdir_lock.WorkdirLock, 'acquire', full)
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={tmp_path}')
  assert_one_clear_line(code, err, 'No space left on device')


@pytest.mark.slow
def test_subprocess_boundary(tmp_path):
  """The real process: exit code 2 and exactly one stderr line (the in-process cases share its code path)."""
  result = run_launch(CLASSIFIER, f'--workdir={tmp_path}', '--config.seed=-1', timeout=120)
  assert_one_clear_line(result.returncode, result.stderr, 'config.seed=-1')


def test_profile_window_after_the_run_is_one_line(monkeypatch, capsys, tmp_path):
  """The smoke run has 2 epochs of 50 steps: a window from step 100 would never be traced."""
  if not has_fashion_mnist():
    pytest.skip(f'Fashion-MNIST not in {FMNIST_DIR}')
  before = snapshot(tmp_path)
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={tmp_path}', '--config.profile_steps=(100, 105)')
  assert_one_clear_line(code, err, 'config.profile_steps=(100, 105) starts after the run ends (steps 0..99)')
  assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_eval_batch_larger_than_memory_stops_before_training(monkeypatch, capsys, tmp_path):
  """An evaluation batch that cannot fit is refused when compiled, before the first step (nothing trained)."""
  if not has_fashion_mnist():
    pytest.skip(f'Fashion-MNIST not in {FMNIST_DIR}')
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={tmp_path}', '--config.eval_batch_size=40000000')
  assert_one_clear_line(code, err, 'config.eval_batch_size=40000000 needs about')
  assert 'lower --config.eval_batch_size' in err
  assert not os.listdir(tmp_path / 'checkpoints')


@pytest.mark.slow
def test_encoder_batch_larger_than_memory_stops_before_extraction(monkeypatch, capsys, tmp_path):
  from cnn_caption.training import memory

  monkeypatch.setattr(memory, 'available_bytes', lambda device: 2**20)  # a machine with 1 MiB free
  code, err = run_cli(monkeypatch, capsys, CAPTIONER, f'--workdir={tmp_path}')
  assert_one_clear_line(code, err, 'feature extraction with config.encoder.batch_size=16 needs about')
  assert not os.path.exists(tmp_path / 'features') or not any(
    name.endswith('.npy') for _, _, files in os.walk(tmp_path / 'features') for name in files
  )
