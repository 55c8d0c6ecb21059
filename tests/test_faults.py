"""Faults: damaged checkpoints, config changes on resume, restore_step, the lock, leftovers, modes, sweep kills.

One small classifier run is shared by the module; each test works on a copy.
"""

import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_bad_inputs import _LOG_LINE as LOG_LINE
from test_bad_inputs import assert_one_clear_line
from test_bad_inputs import CLASSIFIER
from test_bad_inputs import run_cli
from test_bad_inputs import snapshot

from cnn_caption import io_utils
from cnn_caption import train
from cnn_caption.captioning import features as features_lib
from cnn_caption.errors import UserError
from cnn_caption.tasks.classification import ClassificationTask
from cnn_caption.training import checkpoint
from configs import classifier as classifier_config
from conftest import needs_fmnist
from conftest import override
from conftest import ROOT

pytestmark = [needs_fmnist, pytest.mark.slow]
SMALL = ['--config.data.num_train=64', '--config.data.num_eval=32', '--config.eval_batch_size=32']


def small_config(**fields):
  config = classifier_config.get_config('smoke')
  config.data.num_train, config.data.num_eval, config.eval_batch_size = 64, 32, 32
  return override(config, **fields)


def params_at(workdir, step, sub='checkpoints'):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, sub), 3)
  try:
    return ckpt.restore_params(step)
  finally:
    ckpt.close()


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A finished 2-epoch run (checkpoints at steps 8 and 16), written under umask 022."""
  workdir = str(tmp_path_factory.mktemp('base') / 'run')
  old = os.umask(0o022)
  try:
    train.train_and_evaluate(small_config(), workdir)
  finally:
    os.umask(old)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['16', '8']
  return workdir


def copy_of(base, tmp_path):
  out = str(tmp_path / 'run')
  shutil.copytree(base, out)
  return out


def damage(workdir, step, kind):
  state = os.path.join(workdir, 'checkpoints', str(step), 'state')
  if kind == 'truncated':
    files = glob.glob(os.path.join(state, '**', 'd', '*'), recursive=True)
    assert files
    for f in files:
      os.truncate(f, os.path.getsize(f) // 2)
  elif kind == 'largest_cut':  # only the largest data file, cut in half: reads fail with OUT_OF_RANGE
    files = [f for f in glob.glob(os.path.join(state, 'ocdbt.process_*', 'd', '*')) if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
  elif kind == 'ocdbt_deleted':
    for d in glob.glob(os.path.join(state, 'ocdbt.process_*')) + [os.path.join(state, 'd')]:
      shutil.rmtree(d)
  elif kind == 'metadata_deleted':
    os.remove(os.path.join(state, '_METADATA'))


def test_files_follow_the_umask(base):
  for name in ('results.json', 'metrics.jsonl', 'plots/train_loss.png'):
    assert stat.S_IMODE(os.stat(os.path.join(base, name)).st_mode) == 0o644, name
  for path in glob.glob(os.path.join(base, 'checkpoints', '16', '**', '*'), recursive=True):
    assert os.stat(path).st_mode & stat.S_IROTH, path  # another user can read the checkpoint (to caption)


def test_every_output_of_a_run_is_checked_for_links(base):
  assert set(os.listdir(base)) <= set(io_utils.WORKDIR_OUTPUTS)


@pytest.mark.parametrize('mode, name', [('train', 'plots'), ('train', 'tensorboard'), ('caption', 'captions')])
def test_linked_output_folder_stops_before_writing(base, tmp_path, monkeypatch, capsys, mode, name):
  workdir = copy_of(base, tmp_path)
  outside = tmp_path / 'outside'
  outside.mkdir()
  shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  os.symlink(outside, os.path.join(workdir, name))
  before = snapshot(workdir)
  args = [CLASSIFIER, *SMALL] if mode == 'train' else ['--mode=caption', f'--images={ROOT}/README.md']
  code, err = run_cli(monkeypatch, capsys, *args, f'--workdir={workdir}')
  assert_one_clear_line(code, err, f'{workdir}/{name} is a symbolic link')
  assert snapshot(workdir) == before and os.listdir(outside) == []


@pytest.mark.parametrize('kind', ['truncated', 'largest_cut'])
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(base, tmp_path, caplog, kind):
  workdir = copy_of(base, tmp_path)
  damage(workdir, 16, kind)
  # Leftovers of a killed save are removed on the next start.
  open(os.path.join(workdir, '.tmp-abc'), 'w').close()
  os.makedirs(os.path.join(workdir, 'checkpoints', '24.orbax-checkpoint-tmp-1'))
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(small_config(log_every_steps=3), workdir)  # a reporting-only change is fine
  assert 'checkpoints/16 is damaged' in caplog.text
  assert not os.path.exists(os.path.join(workdir, '.tmp-abc'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['16', '8']
  assert os.listdir(os.path.join(workdir, 'checkpoints_damaged')) == ['16']
  assert_same(params_at(workdir, 16), params_at(base, 16))  # retrained from step 8: the same numbers


@pytest.mark.parametrize('kind', ['truncated', 'largest_cut', 'ocdbt_deleted', 'metadata_deleted'])
def test_no_intact_checkpoint_is_one_line(base, tmp_path, monkeypatch, capsys, kind):
  workdir = copy_of(base, tmp_path)
  for step in (8, 16):
    damage(workdir, step, kind)
  before = snapshot(workdir)
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL)
  assert_one_clear_line(code, err, 'no intact checkpoint')
  assert 'Event loop is closed' not in err
  assert snapshot(workdir) == before


def test_damaged_best_checkpoint_is_one_line_when_captioning_or_testing(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  best = os.path.join(workdir, 'checkpoints_best', '16', 'state')
  largest = max(
    (f for f in glob.glob(os.path.join(best, '**', '*'), recursive=True) if os.path.isfile(f)), key=os.path.getsize
  )
  os.truncate(largest, os.path.getsize(largest) // 2)
  with pytest.raises(UserError, match='checkpoints_best/16 is damaged'):
    checkpoint.best_params(workdir)


@pytest.mark.parametrize(
  'args, fields',
  [
    (['--config.batch_size=16'], 'batch_size: 8 -> 16'),
    (['--config.seed=1', '--config.optimizer.name=adam'], "optimizer.name: 'sgd' -> 'adam'; seed: 0 -> 1"),
    (['--config.model.num_classes=12'], 'model.num_classes: 10 -> 12'),
  ],
)
def test_resume_with_another_config_lists_the_fields(base, tmp_path, monkeypatch, capsys, args, fields):
  workdir = copy_of(base, tmp_path)
  before = snapshot(workdir)
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL, *args)
  assert_one_clear_line(code, err, fields)
  assert 'allow_config_change=True' in err
  assert snapshot(workdir) == before


def test_changed_model_allowed_still_stops_in_one_line(base, tmp_path, monkeypatch, capsys):
  workdir = copy_of(base, tmp_path)
  code, err = run_cli(
    monkeypatch,
    capsys,
    CLASSIFIER,
    f'--workdir={workdir}',
    *SMALL,
    '--config.model.num_classes=12',
    '--config.checkpoint.allow_config_change=True',
  )
  assert_one_clear_line(code, err, 'holds arrays of other shapes')
  assert 'Event loop is closed' not in err


def test_restore_step_resumes_from_an_older_step(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  with pytest.raises(UserError, match='restore_step=5 is not in .*saved steps: 8, 16'):
    train.train_and_evaluate(small_config(**{'checkpoint.restore_step': 5}), workdir)
  train.train_and_evaluate(small_config(**{'checkpoint.restore_step': 8}), workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints_superseded')) == ['16']
  assert_same(params_at(workdir, 16), params_at(base, 16))
  assert [r['epoch'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))] == [1, 2]


def test_blown_up_parameters_are_never_saved(base, tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match='blew up|loss became'):
    train.train_and_evaluate(small_config(**{'optimizer.learning_rate': 1e4}), workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  for step in ckpt.all_steps():
    largest = max(float(np.abs(np.asarray(p)).max()) for p in jax.tree.leaves(ckpt.restore_params(step)))
    assert np.isfinite(largest) and largest <= train.MAX_PARAM_ABS, (step, largest)
  ckpt.close()


def _hold_lock(workdir):
  code = (
    'import sys, time; from cnn_caption.training import workdir_lock; '
    f'workdir_lock.WorkdirLock({workdir!r}).acquire(); print("held", flush=True); time.sleep(120)'
  )
  proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_second_run_on_a_live_workdir_stops_at_once(base, tmp_path, monkeypatch, capsys):
  workdir = copy_of(base, tmp_path)
  holder = _hold_lock(workdir)
  try:
    before = snapshot(workdir)
    code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL)
    assert_one_clear_line(code, err, f'in use by another run (pid {holder.pid} on host')
    assert snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL)  # stale: taken over
  assert code == 0, err[-2000:]


def test_sweep_member_killed_is_named_and_the_parent_exits(tmp_path):
  workdir = tmp_path / 'sweep'
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
    [
      sys.executable,
      'launch.py',
      '--config=configs/classifier.py:smoke_sweep',
      f'--workdir={workdir}',
      '--config.sweep.learning_rates=(0.01,0.1)',
      '--config.sweep.parallel=2',
      '--config.num_epochs=50',
      *SMALL,
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  victim_lock = workdir / 'lr_0.1' / '.lock'
  deadline = time.time() + 240
  pid = None
  while time.time() < deadline and proc.poll() is None and pid is None:
    try:
      pid = json.loads(victim_lock.read_text())['pid']
    except (OSError, ValueError, KeyError):
      time.sleep(0.2)
  assert pid is not None, 'the member never started'
  os.kill(pid, signal.SIGKILL)
  killed_at = time.time()
  try:
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert time.time() - killed_at < 30
  assert proc.returncode == 2
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and 'lr_0.1' in lines[0] and 'SIGKILL' in lines[0], err[-3000:]
  assert 'Traceback' not in err


def _signal_when(monkeypatch, owner, name, signum, when=lambda *args, **kwargs: True):
  """owner.name sends signum to this process when `when(...)` holds for a call, then runs as before."""
  original = getattr(owner, name)

  def wrapper(*args, **kwargs):
    if when(*args, **kwargs):
      os.kill(os.getpid(), signum)
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, wrapper)


def _one_stop_line(code, err, expected_code, text):
  lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
  assert 'Traceback' not in err, err[-3000:]
  assert (code, len(lines)) == (expected_code, 1), (code, err[-3000:])
  assert text in lines[0], lines[0]


@pytest.mark.parametrize(
  'signum, code, line',
  [
    (signal.SIGTERM, 0, 'preempted during the final evaluation; nothing new to save; restart the same command'),
    (signal.SIGINT, 130, 'interrupted during the final evaluation; nothing new to save; restart the same command'),
  ],
)
def test_signal_in_the_final_evaluation_is_one_line(base, tmp_path, monkeypatch, capsys, signum, code, line):
  workdir = copy_of(base, tmp_path)  # finished: a rerun restores step 16 and goes straight to the evaluation
  os.remove(os.path.join(workdir, 'results.json'))
  _signal_when(monkeypatch, ClassificationTask, 'final_results', signum)
  got, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL)
  _one_stop_line(got, err, code, line)
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


@pytest.mark.slow
def test_signal_in_the_last_epochs_end_saves_and_stops(base, tmp_path, monkeypatch, capsys):
  workdir = copy_of(base, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '16'))  # epoch 2 is trained again
  os.remove(os.path.join(workdir, 'results.json'))
  # The first validation after the restore at step 8 is epoch 2's, the last epoch's end.
  _signal_when(monkeypatch, ClassificationTask, 'evaluate', signal.SIGTERM, lambda self, params, split: split == 'val')
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL)
  _one_stop_line(code, err, 0, 'preempted at step 16; restart the same command to resume')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['16', '8']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


@pytest.mark.slow
def test_sighup_mid_epoch_saves_at_the_next_call_like_sigterm(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'run')
  _signal_when(monkeypatch, ClassificationTask, 'train_batch', signal.SIGHUP, lambda self, idx, step, p=None: step == 2)
  code, err = run_cli(monkeypatch, capsys, CLASSIFIER, f'--workdir={workdir}', *SMALL, '--config.steps_per_call=2')
  _one_stop_line(code, err, 0, 'preempted at step 4 (SIGHUP); restart the same command to resume')
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['4']


@pytest.mark.slow
def test_sigterm_in_feature_extraction_is_one_line(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'run')
  _signal_when(monkeypatch, features_lib, 'extract_features', signal.SIGTERM)
  code, err = run_cli(monkeypatch, capsys, '--config=configs/captioner.py:smoke', f'--workdir={workdir}')
  _one_stop_line(code, err, 0, 'preempted during setup (config, data, features, restoring the checkpoint)')
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
