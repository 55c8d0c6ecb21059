"""Library-level reliability: readers refuse inconsistent data, bounded weights, file modes, the workdir lock."""

import gc
import gzip
import io
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest

from cnn_caption import config_utils
from cnn_caption import inference
from cnn_caption import io_utils
from cnn_caption import stop_signals
from cnn_caption import train
from cnn_caption.data import captions
from cnn_caption.data import fashion_mnist
from cnn_caption.data import images
from cnn_caption.data import synthetic
from cnn_caption.errors import UserError
from cnn_caption.models import weights
from cnn_caption.tasks import captioning
from cnn_caption.training import parallel
from cnn_caption.training import workdir_lock
from configs import captioner as captioner_config
from configs import classifier as classifier_config


def write_idx(path, array: np.ndarray, gz: bool = False, cut: int = 0) -> None:
  """Writes a uint8 IDX file (cut bytes dropped from the end)."""
  header = bytes([0, 0, 8, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
  data = (header + np.ascontiguousarray(array, np.uint8).tobytes())[: len(header) + array.size - cut]
  with (gzip.open if gz else open)(str(path), 'wb') as f:
    f.write(data)


def idx_dir(tmp_path, n_train=20, n_test=10, **replace):
  """A small four-file IDX folder; replace={'test_labels': array, ...} swaps one file's contents."""
  rng = np.random.default_rng(0)
  arrays = {
    'train_images': rng.integers(0, 256, (n_train, 28, 28)),
    'train_labels': rng.integers(0, 10, n_train),
    'test_images': rng.integers(0, 256, (n_test, 28, 28)),
    'test_labels': rng.integers(0, 10, n_test),
  }
  arrays.update(replace)
  for key, array in arrays.items():
    write_idx(tmp_path / fashion_mnist._FILES[key], np.asarray(array))
  return str(tmp_path)


def test_consistent_small_idx_folder_loads(tmp_path):
  raw = fashion_mnist.load_raw(idx_dir(tmp_path))
  assert raw['train_images'].shape == (20, 28, 28) and raw['test_labels'].shape == (10,)


@pytest.mark.parametrize(
  'replace, match',
  [
    ({'test_labels': np.zeros(9, np.uint8)}, r'9 test labels for 10 test images'),
    ({'train_labels': np.full(20, 10, np.uint8)}, r'20 train labels are outside 0..9 \(first: label 10 at index 0\)'),
    ({'test_labels': np.array([0] * 9 + [255], np.uint8)}, r'label 255 at index 9'),
    ({'test_images': np.zeros((10, 784), np.uint8)}, r't10k-images-idx3-ubyte has 2 dimensions, expected 3'),
    ({'train_labels': np.zeros((20, 1), np.uint8)}, r'train-labels-idx1-ubyte has 2 dimensions, expected 1'),
    ({'test_images': np.zeros((10, 28, 27), np.uint8)}, r'shape \(10, 28, 27\), expected \(N, 28, 28\)'),
  ],
)
def test_inconsistent_idx_data_is_named(tmp_path, replace, match):
  with pytest.raises(UserError, match=match):
    fashion_mnist.load_raw(idx_dir(tmp_path, **replace))


def test_labels_beyond_a_smaller_num_classes_blame_the_config(tmp_path):
  with pytest.raises(UserError, match='num_classes=10'):
    fashion_mnist.load_raw(idx_dir(tmp_path, train_labels=np.full(20, 7)), num_classes=5)


def test_truncated_header_and_truncated_gzip_are_named(tmp_path):
  path = tmp_path / 'cut'
  path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
  with pytest.raises(UserError, match='header ends early'):
    fashion_mnist.read_idx(str(path))
  write_idx(tmp_path / 'whole.gz', np.zeros((5, 28, 28)), gz=True)
  (tmp_path / 'cut.gz').write_bytes((tmp_path / 'whole.gz').read_bytes()[:-20])
  with pytest.raises(UserError, match='cut.gz'):
    fashion_mnist.read_idx(str(tmp_path / 'cut.gz'))


def test_negative_limits_are_refused():
  with pytest.raises(UserError, match='num_eval=-50'):
    fashion_mnist.load_splits('/nonexistent', num_eval=-50)


@pytest.mark.parametrize(
  'path, match',
  [
    ('/dev/null', 'not a regular file'),
    ('/', 'is a directory'),
    ('/nonexistent/x.png', 'does not exist'),
  ],
)
def test_image_path_says_what_it_is(path, match):
  with pytest.raises(UserError, match=match):
    images.load_image(path, 32)


def test_empty_image_file_is_named(tmp_path):
  (tmp_path / 'empty.png').write_bytes(b'')
  with pytest.raises(UserError, match='empty.png is empty'):
    images.load_image(str(tmp_path / 'empty.png'), 32)


def _fake_torch(monkeypatch):
  """Just enough of a `torch` module for pickle to write a state dict by name (torch is not installed)."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  class FloatStorage:
    pass

  FloatStorage.__module__, FloatStorage.__qualname__ = 'torch', 'FloatStorage'

  def _rebuild_tensor_v2(*args):
    del args

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  torch.FloatStorage, torch._utils, utils._rebuild_tensor_v2 = FloatStorage, utils, _rebuild_tensor_v2
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return FloatStorage, _rebuild_tensor_v2


def write_tensor_pth(path, monkeypatch, numel: int, size, stride, record_bytes: int | None = None) -> None:
  """A zip .pth holding one float32 tensor {'w': ...} with the given geometry over a storage of numel."""
  storage_cls, rebuild = _fake_torch(monkeypatch)

  class Storage:
    pass

  class Tensor:
    def __reduce__(self):
      return (rebuild, (Storage(), 0, tuple(size), tuple(stride), False, None))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return ('storage', storage_cls, '0', 'cpu', numel) if isinstance(obj, Storage) else None

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump({'w': Tensor()})
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', buf.getvalue())
    z.writestr('archive/data/0', b'\0' * (numel * 4 if record_bytes is None else record_bytes))


def test_well_formed_fake_tensor_reads(tmp_path, monkeypatch):
  path = tmp_path / 'ok.pth'
  write_tensor_pth(path, monkeypatch, 6, (2, 3), (3, 1))
  monkeypatch.delitem(sys.modules, 'torch')
  assert weights.load_torch_state_dict(str(path))['w'].shape == (2, 3)


@pytest.mark.parametrize(
  'numel, size, stride, match',
  [
    (1, (10**6, 10**6), (0, 0), 'GiB limit'),  # the 3.6 TiB stride-0 trick
    (1, (1000, 1000), (0, 0), 'claims 1000000 elements from a storage of 1'),
    (6, (2, 3), (4, 1), 'overruns its storage'),
    (4, (2, 3), (3, 1), 'claims 6 elements from a storage of 4'),
  ],
)
def test_tensors_claiming_more_than_their_storage_are_refused(tmp_path, monkeypatch, numel, size, stride, match):
  path = tmp_path / 'bomb.pth'
  write_tensor_pth(path, monkeypatch, numel, size, stride)
  with pytest.raises(UserError, match=match):
    weights.load_torch_state_dict(str(path))


def test_storage_record_shorter_than_claimed_is_refused(tmp_path, monkeypatch):
  path = tmp_path / 'short.pth'
  write_tensor_pth(path, monkeypatch, 6, (2, 3), (3, 1), record_bytes=8)
  with pytest.raises(UserError, match='shorter than its storage'):
    weights.load_torch_state_dict(str(path))


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    io_utils.write_json(str(tmp_path / 'a.json'), {'x': 1})
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'a.json').st_mode) == mode
  assert os.listdir(tmp_path) == ['a.json']


def test_stale_temporaries_are_removed(tmp_path):
  (tmp_path / '.tmp-abc').write_text('half')
  (tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-123').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '5').mkdir()
  (tmp_path / 'keep.json').write_text('{}')
  removed = io_utils.remove_stale_temporaries(str(tmp_path))
  assert sorted(os.path.basename(p) for p in removed) == ['.tmp-abc', '7.orbax-checkpoint-tmp-123']
  assert sorted(os.listdir(tmp_path)) == ['checkpoints', 'keep.json']
  assert os.listdir(tmp_path / 'checkpoints') == ['5']


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert workdir_lock.read_holder(str(tmp_path))['pid'] == os.getpid()
    with pytest.raises(UserError, match=rf'in use by another run \(pid {os.getpid()} on host '):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert workdir_lock.read_holder(str(tmp_path)) == {}
  with workdir_lock.WorkdirLock(str(tmp_path)):  # free again after release
    pass


def test_lock_held_by_another_live_process_is_refused(tmp_path, caplog):
  code = (
    'import sys, time; from cnn_caption.training import workdir_lock; '
    f'workdir_lock.WorkdirLock({str(tmp_path)!r}).acquire(); print("held", flush=True); time.sleep(60)'
  )
  proc = subprocess.Popen(
    [sys.executable, '-c', code],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    assert proc.stdout.readline().strip() == 'held'
    with pytest.raises(UserError, match=rf'pid {proc.pid} '):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    proc.kill()
    proc.wait()
  # The kernel dropped the dead process's flock: the lock is stale and is taken over with a warning.
  assert workdir_lock.read_holder(str(tmp_path))['pid'] == proc.pid
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  with caplog.at_level('WARNING'):
    lock.acquire()
  assert f'taking over the stale lock of pid {proc.pid}' in caplog.text
  assert workdir_lock.read_holder(str(tmp_path))['pid'] == os.getpid()
  lock.release()


def test_lock_in_an_unwritable_place_is_one_line(tmp_path):
  with pytest.raises(UserError, match='cannot create the lock file'):
    workdir_lock.WorkdirLock(str(tmp_path / 'missing' / 'dir')).acquire()


@pytest.mark.parametrize('name', ['plots', 'tensorboard', 'captions', 'checkpoints', 'eval.jsonl'])
def test_a_linked_output_in_the_workdir_is_refused(tmp_path, name):
  outside = tmp_path / 'outside'
  outside.mkdir()
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / name).symlink_to(outside)
  with pytest.raises(UserError, match=rf'{workdir / name} is a symbolic link \(to {outside}\).*replace the link'):
    io_utils.prepare_workdir(str(workdir))
  assert os.listdir(outside) == []
  (workdir / name).unlink()
  io_utils.prepare_workdir(str(workdir))  # a real folder (or none) is fine


# Settings that were silently wrong or ignored: each is one clear line before anything is trained or written.


def _fake_raw(n_test: int) -> dict:
  return {
    'train_images': np.zeros((60_000, 28, 28), np.uint8),
    'train_labels': np.zeros(60_000, np.uint8),
    'test_images': np.zeros((n_test, 28, 28), np.uint8),
    'test_labels': np.zeros(n_test, np.uint8),
  }


@pytest.mark.parametrize(
  'n_test, limits, match',
  [
    (0, {}, 'the test split of the Fashion-MNIST data has no examples'),
    (10, {'num_train': 50_001}, r'num_train=50001 asks for more train examples than the 50000 there are'),
    (10, {'num_eval': 11}, r'num_eval=11 asks for more test examples than the 10 there are'),
  ],
)
def test_empty_or_too_small_splits_are_refused(monkeypatch, n_test, limits, match):
  monkeypatch.setattr(fashion_mnist, 'load_raw', lambda *args: _fake_raw(n_test))
  with pytest.raises(UserError, match=match):
    fashion_mnist.load_splits(None, **limits)
  if n_test:
    assert len(fashion_mnist.load_splits(None, num_eval=n_test)['test'][1]) == n_test  # all there is: fine


class _FakeTask:
  num_train = 64  # 8 steps of batch 8 an epoch


def _trainer(tmp_path, **fields):
  config = classifier_config.get_config('smoke')
  config.num_epochs = 2
  for key, value in fields.items():
    config[key] = value
  return train.Trainer(config, str(tmp_path), _FakeTask(), parallel.make_mesh())


def test_profile_window_past_the_run_is_refused(tmp_path):
  with pytest.raises(UserError, match=r'profile_steps=\(10, 17\) reaches past the end of the run \(16 steps'):
    _trainer(tmp_path, profile_steps=(10, 17))
  assert _trainer(tmp_path, profile_steps=(10, 16)).total_steps == 16


def test_steps_per_call_beyond_an_epoch_is_cut_to_the_epoch_with_a_line(tmp_path, caplog):
  with caplog.at_level('INFO'):
    trainer = _trainer(tmp_path, steps_per_call=1000)
  assert trainer.steps_per_call == 8
  assert 'config.steps_per_call=1000 is more than the 8 steps of an epoch; using 8' in caplog.text


def _captioner(**decoding):
  config = captioner_config.get_config('smoke')
  config.decoding.update(decoding)
  return config


@pytest.mark.parametrize(
  'decoding, match',
  [
    ({'val_length_penalties': (0.5, 1.0)}, r'val_length_penalties=\(0.5, 1.0\) needs a beam size > 1'),
    ({'val_beam_sizes': (1,), 'val_length_penalties': (0.5,)}, 'needs a beam size > 1'),
    ({'method': 'beam', 'beam_size': 500}, r'beam_size holds beam size 500, but the vocabulary has only \d+'),
    ({'val_beam_sizes': (1, 400)}, r'val_beam_sizes holds beam size 400'),
  ],
)
def test_decoding_settings_that_cannot_work_are_refused_before_any_file(decoding, match):
  with pytest.raises(UserError, match=match):
    config_utils.validate(_captioner(**decoding))


def test_synthetic_vocabulary_bound_holds_every_caption_word():
  words = set()
  for i in range(300):
    rng = np.random.default_rng([0, i])
    scene = synthetic._sample_scene(rng)
    for template in range(synthetic._NUM_TEMPLATES):
      words |= set(synthetic._caption(scene, template, rng).split())
  assert words == synthetic.caption_words()


def _tiny_dataset(root, tokens) -> str:
  images = []
  for i, split in enumerate(['train', 'val', 'test']):
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'images' / f'{i}.png').write_bytes(b'')
    images.append({'filename': f'{i}.png', 'filepath': 'images', 'split': split, 'sentences': [{'tokens': tokens}]})
  (root / 'dataset.json').write_text(json.dumps({'images': images}))
  return str(root)


def test_beam_wider_than_a_real_vocabulary_stops_before_features(tmp_path):
  config = _captioner(method='beam', beam_size=7)
  config.data.dir = _tiny_dataset(tmp_path / 'data', ['a', 'red', 'circle'])  # 4 specials + 3 words
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with pytest.raises(UserError, match='beam size 7, but the vocabulary has only 7 entries'):
    captioning.CaptioningTask(config, str(workdir), parallel.make_mesh())
  assert os.listdir(workdir) == []


@pytest.mark.parametrize('token', ['<eos>', '<PAD>', '<bos>'])
def test_a_caption_holding_a_vocabulary_marker_is_refused(tmp_path, token):
  root = _tiny_dataset(tmp_path / 'data', ['a', token, 'circle'])
  with pytest.raises(UserError, match=f'holds {token.lower()}, which the vocabulary reserves'):
    captions.load_karpathy(root)
  assert captions.load_karpathy(_tiny_dataset(tmp_path / 'ok', ['a', '<unk>', 'circle']))['train']


def test_impossible_image_size_in_a_caption_workdir_blames_its_config(tmp_path):
  config = captioner_config.get_config('smoke')
  config.data.image_size = 0
  io_utils.write_json(str(tmp_path / 'config.json'), config.to_dict())
  with pytest.raises(UserError, match=r'config.json holds an impossible value \(config.data.image_size=0 is invalid'):
    inference.load_trained(str(tmp_path))


def _signal_and_let_it_land(signum):
  os.kill(os.getpid(), signum)
  for _ in range(100_000):  # the handler runs in here: Python checks for signals between bytecodes
    pass


def _stop_inside_a_gc_callback(signum):
  def callback(phase, info):
    del info
    if phase == 'start':
      _signal_and_let_it_land(signum)

  gc.callbacks.append(callback)  # as JAX's collector callback is
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)


def _stop_inside_a_finalizer(signum):
  class SignalsWhenCollected:
    def __del__(self):
      _signal_and_let_it_land(signum)

  SignalsWhenCollected()  # its __del__ runs at once


@pytest.mark.parametrize('land', [_stop_inside_a_gc_callback, _stop_inside_a_finalizer])
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=['SIGTERM', 'SIGHUP', 'SIGINT'])
def test_a_stop_that_lands_in_unraisable_code_still_stops_and_prints_nothing(land, signum, capfd):
  # Python reports an exception raised inside a gc callback or a __del__ as "Exception ignored" and goes on:
  # the stop must not be lost there, nor reported.
  reported = []
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sys, 'unraisablehook', reported.append)
    with pytest.raises(parallel.Preempted) as stopped:
      with parallel.StopRequest('setup'):
        land(signum)
        time.sleep(5)  # the stop comes here, or never
    assert sys.unraisablehook == reported.append  # put back on leaving
  assert stopped.value.signal_name == signal.Signals(signum).name
  assert not reported, [r.exc_value for r in reported]
  err = capfd.readouterr().err
  assert 'Exception ignored' not in err and 'Traceback' not in err, err


def test_other_unraisable_errors_are_still_reported():
  class Broken:
    def __del__(self):
      raise ValueError('a real bug in a finalizer')

  reported = []
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sys, 'unraisablehook', reported.append)
    with parallel.StopRequest('setup'):
      Broken()
  assert [str(r.exc_value) for r in reported] == ['a real bug in a finalizer']


def test_a_second_ctrl_c_lost_in_unraisable_code_still_interrupts():
  reported = []
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sys, 'unraisablehook', reported.append)
    with pytest.raises(KeyboardInterrupt):
      with parallel.StopRequest(parallel.TRAINING):
        _signal_and_let_it_land(signal.SIGINT)  # the first Ctrl-C in training is only noted
        _stop_inside_a_gc_callback(signal.SIGINT)  # the second one lands in the collector's callback
        time.sleep(5)
  assert not reported, [r.exc_value for r in reported]


def _catches_sigterm(pid) -> bool:
  with open(f'/proc/{pid}/status') as f:
    caught = int(next(line for line in f if line.startswith('SigCgt:')).split()[1], 16)
  return bool(caught >> (signal.SIGTERM - 1) & 1)


def _stop_while_importing(argv: list[str], signum: int) -> tuple[str, int]:
  """Starts a program, sends `signum` as soon as /proc says it catches SIGTERM; (stderr, exit code)."""
  # The stop signals at their defaults, as from a terminal: an ignored disposition is inherited across exec
  # (a test worker may ignore SIGINT; a suite started under nohup ignores SIGHUP) and the program rightly keeps
  # it, so the small program resets all three, then becomes the program (same process).
  exec_with_default_signals = (
    'import os, signal, sys\n'
    f'for s in {tuple(int(s) for s in stop_signals.SIGNALS)}: signal.signal(s, signal.SIG_DFL)\n'
    'os.execv(sys.argv[1], sys.argv[1:])'
  )
  proc = subprocess.Popen(
    [sys.executable, '-c', exec_with_default_signals, sys.executable, *argv],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 60
  while proc.poll() is None and not _catches_sigterm(proc.pid) and time.time() < deadline:
    time.sleep(0.001)  # the program's first lines install the handlers; importing jax then takes about a second
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  return err, proc.returncode


_STOP_SIGNALS = pytest.mark.parametrize(
  'signum', [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=['SIGTERM', 'SIGHUP', 'SIGINT']
)


@_STOP_SIGNALS
def test_a_stop_while_launch_imports_is_one_line_and_writes_nothing(tmp_path, signum):
  # Before the run's own handling exists, Ctrl-C printed a KeyboardInterrupt traceback from inside an import,
  # and the run then went on; SIGTERM ended it without a word.
  workdir = tmp_path / 'run'
  err, code = _stop_while_importing(
    ['launch.py', '--config=configs/classifier.py:smoke', f'--workdir={workdir}'], signum
  )
  word, expected_code = ('interrupted', 130) if signum == signal.SIGINT else ('preempted', 0)
  name = signal.Signals(signum).name
  assert err.splitlines() == [f'{word} ({name}) while starting; nothing written; restart the same command'], err[-2000:]
  assert code == expected_code
  assert not workdir.exists()


@_STOP_SIGNALS
@pytest.mark.parametrize('program', ['inference', 'compare'])
def test_a_stop_in_a_side_tool_is_one_line(tmp_path, signum, program):
  # The seed-ensemble and paired-bootstrap tools have nothing to save: a stop ends them with one line (it was
  # a KeyboardInterrupt traceback, or no word at all for SIGTERM), exit 130 for Ctrl-C, 128 + N otherwise.
  out = tmp_path / 'ens'
  argv, when = {
    'inference': (
      ['-m', 'cnn_caption.inference', f'--out={out}', str(tmp_path / 'a'), str(tmp_path / 'b')],
      'before the results were written; run the same command again',
    ),
    'compare': (
      ['-m', 'cnn_caption.captioning.compare', str(tmp_path / 'a'), str(tmp_path / 'b')],
      'while comparing; nothing is written, run the same command again',
    ),
  }[program]
  err, code = _stop_while_importing(argv, signum)
  word, expected_code = ('interrupted', 130) if signum == signal.SIGINT else ('stopped', 128 + signum)
  assert err.splitlines() == [f'{word} ({signal.Signals(signum).name}) {when}'], err[-2000:]
  assert code == expected_code
  assert not out.exists()
